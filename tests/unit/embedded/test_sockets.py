"""Unit tests of tessera.embedded: where the embedded services' sockets go when the data
directory is too deep for a Unix socket path."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tessera.core.errors import ConfigError
from tessera.embedded import SOCKET_PATH_MAX, EmbeddedValkey, private_socket_dir, valkey_socket


def _deep(base: Path) -> Path:
    return base / ("a" * 60) / ("b" * 60) / "valkey"


@pytest.fixture
def short_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short temporary directory (pytest's own is too deep for a socket path)."""
    path = Path(tempfile.mkdtemp(prefix="tv-", dir="/tmp"))
    path.chmod(0o1777)  # like /tmp
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    yield path
    shutil.rmtree(path)


def _prepared(directory: Path) -> Path:
    valkey = EmbeddedValkey(directory)
    valkey.prepare()
    assert f"unixsocket {valkey.socket}\n" in (valkey.directory / "valkey.conf").read_text()
    return valkey.socket


def test_a_short_directory_keeps_its_socket_inside(tmp_path: Path) -> None:
    assert valkey_socket(tmp_path / "valkey") == tmp_path / "valkey" / "valkey.sock"
    assert _prepared(tmp_path / "valkey") == tmp_path / "valkey" / "valkey.sock"


def test_a_deep_directory_gets_a_private_short_socket_directory_kept_across_starts(
    tmp_path: Path, short_tmp: Path,
) -> None:
    one, two = _deep(tmp_path / "x"), _deep(tmp_path / "y")
    assert len(os.fsencode(one / "valkey.sock")) > SOCKET_PATH_MAX
    assert valkey_socket(one) is None  # never started: nothing to find
    sock = _prepared(one)
    assert len(os.fsencode(sock)) <= SOCKET_PATH_MAX
    assert sock.parent.parent == short_tmp and sock.parent.name.startswith("tessera-valkey-")
    st = sock.parent.lstat()
    assert st.st_uid == os.geteuid() and st.st_mode & 0o777 == 0o700
    assert valkey_socket(one) == sock  # what doctor reads
    assert _prepared(one) == sock  # a restart (of Valkey, or of the node) binds it again
    assert _prepared(two) != sock  # another node's is another


@pytest.mark.parametrize("taken", ["another account's directory", "a symlink", "gone"])
def test_a_recorded_directory_that_is_not_ours_any_more_is_replaced(
    tmp_path: Path, short_tmp: Path, taken: str,
) -> None:
    """After a reboot empties /tmp, another account may make a directory of the recorded
    name first: the node makes a new one of its own instead (it does not refuse to start)."""
    if os.geteuid() != 0 and taken != "gone":
        pytest.fail("this test needs root to plant a directory of another account")
    deep = _deep(tmp_path / "data")
    sock = _prepared(deep)
    shutil.rmtree(sock.parent)
    if taken == "a symlink":
        (short_tmp / "elsewhere").mkdir(mode=0o700)
        sock.parent.symlink_to(short_tmp / "elsewhere")
    elif taken == "another account's directory":
        sock.parent.mkdir(mode=0o700)
        nobody = pwd.getpwnam("nobody")
        os.chown(sock.parent, nobody.pw_uid, nobody.pw_gid)
    fresh = _prepared(deep)
    assert fresh != sock and fresh.parent.parent == short_tmp
    assert not fresh.parent.is_symlink() and fresh.parent.stat().st_uid == os.geteuid()
    assert valkey_socket(deep) == fresh


def test_a_restart_of_valkey_keeps_its_socket_path_or_refuses(
    tmp_path: Path, short_tmp: Path,
) -> None:
    """The serving processes know the socket path: a restart of Valkey (the same object,
    prepare() again) keeps it, makes the directory again if it was removed, and refuses
    one another account made in its place."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root to plant a directory of another account")
    valkey = EmbeddedValkey(_deep(tmp_path / "data"))
    valkey.prepare()
    sock = valkey.socket
    shutil.rmtree(sock.parent)  # a tmp cleaner
    valkey.prepare()
    assert valkey.socket == sock and valkey_socket(valkey.directory) == sock
    assert sock.parent.stat().st_mode & 0o777 == 0o700
    shutil.rmtree(sock.parent)
    sock.parent.mkdir(mode=0o777)  # another account takes the name first
    sock.parent.chmod(0o777)
    nobody = pwd.getpwnam("nobody")
    os.chown(sock.parent, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(ConfigError) as err:
        valkey.prepare()
    assert str(sock.parent) in str(err.value) and "no longer this node's own" in str(err.value)


def test_a_copy_of_the_data_directory_does_not_take_the_original_socket(
    tmp_path: Path, short_tmp: Path,
) -> None:
    original = _deep(tmp_path / "one")
    sock = _prepared(original)
    copy = _deep(tmp_path / "two")
    shutil.copytree(original.parent, copy.parent)  # its record names the original's
    assert _prepared(copy) != sock
    assert valkey_socket(original) == sock


@pytest.mark.parametrize("change", ["group-readable", "another name", "another account's"])
def test_a_recorded_directory_is_reused_only_as_the_node_left_it(
    tmp_path: Path, short_tmp: Path, change: str,
) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root to plant a directory of another account")
    deep = _deep(tmp_path / "data")
    sock = _prepared(deep)
    found = sock.parent
    if change == "group-readable":
        found.chmod(0o750)
    elif change == "another name":  # the record edited to name a directory not ours
        other = short_tmp / "not-valkey"
        shutil.copytree(found, other)
        (deep / "socket-dir").write_text(f"{other}\n")
    else:
        nobody = pwd.getpwnam("nobody")
        os.chown(found, nobody.pw_uid, nobody.pw_gid)
    assert valkey_socket(deep) is None  # doctor does not trust it either
    fresh = _prepared(deep)
    assert fresh.parent not in (found, short_tmp / "not-valkey")


def test_a_temporary_directory_of_another_account_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root to plant a directory of another account")
    theirs = Path(tempfile.mkdtemp(prefix="tv-", dir="/tmp"))
    try:
        theirs.chmod(0o1777)  # sticky, but its owner may rename anything in it
        nobody = pwd.getpwnam("nobody")
        os.chown(theirs, nobody.pw_uid, nobody.pw_gid)
        monkeypatch.setattr(tempfile, "tempdir", str(theirs))
        with pytest.raises(ConfigError) as err:
            _prepared(_deep(tmp_path / "data"))
        assert str(theirs) in str(err.value)
    finally:
        shutil.rmtree(theirs)


def test_a_temporary_directory_others_may_rename_in_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    unsafe = Path(tempfile.mkdtemp(prefix="tv-", dir="/tmp"))
    try:
        unsafe.chmod(0o777)  # writable by all, not sticky: anyone may rename our directory
        monkeypatch.setattr(tempfile, "tempdir", str(unsafe))
        with pytest.raises(ConfigError) as err:
            _prepared(_deep(tmp_path / "data"))
        assert str(unsafe) in str(err.value) and "TMPDIR" in str(err.value)
    finally:
        shutil.rmtree(unsafe)


def test_a_socket_path_still_too_long_is_a_clear_error(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    long_tmp = tmp_path / ("t" * 90)
    long_tmp.mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(long_tmp))
    with pytest.raises(ConfigError) as err:
        _prepared(_deep(tmp_path / "data"))
    assert "too long for a Unix socket" in str(err.value) and "valkey.url" in str(err.value)


def test_postgres_socket_directory_of_another_account_is_refused(tmp_path: Path) -> None:
    """The socket directory outside a deep data directory (/tmp/tessera-pg-<uid>/<hash>):
    its parent made first by another account could swap it for its own."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root to plant a directory of another account")
    parent = tmp_path / "tessera-pg-x"
    parent.mkdir(mode=0o777)
    parent.chmod(0o777)
    (parent / "hash").mkdir(mode=0o755)
    # A node not run as root (user None: PostgreSQL runs as the node's own account, which
    # may have no passwd entry): ours, so tightened, not refused, and nothing handed over.
    private_socket_dir(parent / "hash", None)
    assert (parent / "hash").stat().st_mode & 0o777 == 0o700
    assert parent.stat().st_mode & 0o022 == 0
    nobody = pwd.getpwnam("nobody")
    os.chown(parent / "hash", nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(ConfigError) as err:
        private_socket_dir(parent / "hash", None)
    assert str(parent / "hash") in str(err.value)
    os.chown(parent, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(ConfigError) as err:
        private_socket_dir(parent / "hash", None)
    assert str(parent) in str(err.value)
