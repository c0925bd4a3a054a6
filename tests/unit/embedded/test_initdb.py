"""Unit tests of tessera.embedded: initdb's retries (a fake initdb, a real subprocess)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tessera.core.errors import Unavailable
from tessera.embedded import EmbeddedPostgres

#: Fails its first run after leaving a file behind (as initdb does when a parent directory
#: is closed to it meanwhile and it cannot clean up), refuses a directory that is not empty,
#: else "creates the cluster".
_FAKE = """#!/bin/sh
d="$2"
n=$(cat "{calls}" 2>/dev/null || echo 0); echo $((n + 1)) > "{calls}"
if [ -n "$(ls -A "$d")" ]; then echo "initdb: error: $d is not empty" >&2; exit 1; fi
if [ "$n" = 0 ]; then mkdir "$d/base"; touch "$d/base/1"; echo "Permission denied" >&2; exit 1; fi
touch "$d/PG_VERSION"
"""


def _fake_initdb(tmp_path: Path) -> tuple[Path, Path]:
    calls, fake = tmp_path / "calls", tmp_path / "initdb"
    fake.write_text(_FAKE.format(calls=calls))
    fake.chmod(0o755)
    return fake, calls


def _postgres(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> EmbeddedPostgres:
    pg = EmbeddedPostgres(tmp_path / "data" / "postgres")
    pg.pgdata.mkdir(parents=True)
    monkeypatch.setattr(pg, "_user", None)  # run the fake as this account
    return pg


def test_a_failed_initdb_on_a_new_directory_is_retried_on_an_empty_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    pg = _postgres(tmp_path, monkeypatch)
    fake, calls = _fake_initdb(tmp_path)
    pg._initdb(fake)
    assert calls.read_text().strip() == "2"
    assert sorted(p.name for p in pg.pgdata.iterdir()) == ["PG_VERSION"]


def test_a_directory_that_held_files_before_is_never_emptied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    pg = _postgres(tmp_path, monkeypatch)
    (pg.pgdata / "keep").write_text("not ours to remove")
    fake, calls = _fake_initdb(tmp_path)
    with pytest.raises(Unavailable):
        pg._initdb(fake)
    assert calls.read_text().strip() == "3"
    assert (pg.pgdata / "keep").read_text() == "not ours to remove"
