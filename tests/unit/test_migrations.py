"""Bundled migrations: one file per version, so a merge can never hide one."""

from __future__ import annotations

from collections import Counter

from tessera.store import migrations


def test_every_migration_has_its_own_version_number() -> None:
    # migrate() skips every file whose version is already applied: two files sharing a
    # number (two branches each adding "the next one") would leave one never applied.
    versions = Counter(version for version, _, _ in migrations())
    assert [v for v, n in versions.items() if n > 1] == []
    assert sorted(versions) == list(range(1, len(versions) + 1))
