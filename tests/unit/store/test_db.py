"""Bundled migrations: one file per version, so a merge can never hide one."""

from __future__ import annotations

from collections import Counter

import pytest

from tessera.store import migrations, redact_dsn


def test_every_migration_has_its_own_version_number() -> None:
    # migrate() skips every file whose version is already applied: two files sharing a
    # number (two branches each adding "the next one") would leave one never applied.
    versions = Counter(version for version, _, _ in migrations())
    assert [v for v, n in versions.items() if n > 1] == []
    assert sorted(versions) == list(range(1, len(versions) + 1))


@pytest.mark.parametrize(("dsn", "shown"), [
    ("postgresql://u:secret@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("postgresql://u@h/db?password=secret&sslmode=require",
     "postgresql://u@h/db?password=***&sslmode=require"),
    ("host=h user=u password=secret dbname=d", "host=h user=u password=*** dbname=d"),
    ("postgresql://postgres:@/postgres?host=/tmp/x", "postgresql://postgres@/postgres?host=/tmp/x"),
])
def test_dsn_passwords_are_redacted(dsn: str, shown: str) -> None:
    if "://" in dsn:
        assert redact_dsn(dsn) == shown
    else:  # key=value DSNs are re-rendered from libpq's parse, in its order
        assert sorted(redact_dsn(dsn).split()) == sorted(shown.split())
