"""Unit tests of tessera.embedded: where the embedded Valkey's socket goes."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tessera.core.errors import ConfigError
from tessera.embedded import SOCKET_PATH_MAX, EmbeddedValkey, valkey_socket


def _deep(base: Path) -> Path:
    return base / ("a" * 60) / ("b" * 60) / "valkey"


def test_a_short_directory_keeps_its_socket_inside(tmp_path: Path) -> None:
    assert valkey_socket(tmp_path / "valkey") == tmp_path / "valkey" / "valkey.sock"


@pytest.fixture
def short_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short temporary directory (pytest's own is too deep for a socket path)."""
    path = Path(tempfile.mkdtemp(prefix="tv-", dir="/tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    yield path
    shutil.rmtree(path)


def test_a_deep_directory_gets_a_short_stable_socket_path_of_its_own(
    tmp_path: Path, short_tmp: Path,
) -> None:
    one, two = _deep(tmp_path / "x"), _deep(tmp_path / "y")
    sock = valkey_socket(one)
    assert len(os.fsencode(one / "valkey.sock")) > SOCKET_PATH_MAX
    assert len(os.fsencode(sock)) <= SOCKET_PATH_MAX
    assert sock.parent.parent == short_tmp / f"tessera-valkey-{os.geteuid()}"
    assert valkey_socket(one) == sock  # every start of the node finds the same one
    assert valkey_socket(two) != sock  # another node's is another


def test_prepare_makes_the_socket_directories_private(tmp_path: Path, short_tmp: Path) -> None:
    own = short_tmp / f"tessera-valkey-{os.geteuid()}"
    own.mkdir(mode=0o755)
    own.chmod(0o755)  # as a umask of 022 would leave it
    valkey = EmbeddedValkey(_deep(tmp_path / "data"))
    valkey.prepare()
    for d in (valkey.socket.parent, own):
        assert d.stat().st_mode & 0o777 == 0o700, d
    assert f"unixsocket {valkey.socket}\n" in (valkey.directory / "valkey.conf").read_text()


def test_a_socket_path_still_too_long_is_a_clear_error(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / ("t" * 90)))
    with pytest.raises(ConfigError) as err:
        EmbeddedValkey(_deep(tmp_path / "data")).prepare()
    assert "too long for a Unix socket" in str(err.value) and "valkey.url" in str(err.value)


@pytest.mark.parametrize("planted", ["another account's directory", "a symlink"])
def test_a_socket_directory_planted_by_someone_else_is_refused(
    tmp_path: Path, short_tmp: Path, planted: str,
) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root to plant a directory of another account")
    shared = short_tmp / f"tessera-valkey-{os.geteuid()}"
    if planted == "a symlink":
        target = short_tmp / "elsewhere"
        target.mkdir(mode=0o700)
        shared.symlink_to(target)
    else:
        shared.mkdir(mode=0o700)
        nobody = pwd.getpwnam("nobody")
        os.chown(shared, nobody.pw_uid, nobody.pw_gid)
    valkey = EmbeddedValkey(_deep(tmp_path / "data"))
    with pytest.raises(ConfigError) as err:
        valkey.prepare()
    assert str(shared) in str(err.value) and "not a directory of this node's account" in \
        str(err.value)
