"""Retention: export old audit rows as JSON lines, then delete them behind an anchor.

Runs from the CLI against the database directly (like `tessera migrate`), so it works
with the node stopped. Only a verified prefix of the chain is ever removed; the hash of
its last row becomes the anchor that verification of the remaining rows starts from.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psycopg
from psycopg.rows import dict_row

from tessera.audit._chain import AuditRow, ChainVerifier, entry_from_row, payload, prune_entry
from tessera.core.errors import ConfigError, FailedPrecondition

# Serialises prunes (two at once would both move the anchor).
_PRUNE_LOCK = 0x7E55E7A3


@dataclass(frozen=True)
class PruneResult:
    """What a prune removed."""

    pruned: int
    #: Sequence of the last removed row (the new anchor); 0 when nothing was removed.
    anchor_sequence: int
    exported_to: Path | None = None


def prune(dsn: str, cutoff: dt.datetime, export: Path | None = None) -> PruneResult:
    """Remove rows older than `cutoff` (a prefix of the chain), exporting them first."""
    out: IO[str] | None = None
    if export is not None:
        try:
            # Never overwrite an earlier export: it may be the only copy of its rows.
            out = export.open("x", encoding="utf-8")
        except FileExistsError:
            raise ConfigError(f"--export: {export} exists; choose a new file") from None
    try:
        with psycopg.connect(dsn, row_factory=dict_row) as conn, conn.transaction():
            conn.execute("SET LOCAL statement_timeout = 0")
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PRUNE_LOCK,))
            anchor = conn.execute(
                "SELECT sequence, hash FROM audit_anchor WHERE id = 1").fetchone()
            assert anchor is not None, "audit_anchor has its row from the migration"
            last = conn.execute("SELECT max(sequence) AS s FROM audit_log WHERE time < %s",
                                (cutoff,)).fetchone()
            upto = int(last["s"]) if last and last["s"] is not None else 0
            if upto <= int(anchor["sequence"]):
                return PruneResult(0, int(anchor["sequence"]), export)
            # The whole table is verified, not only the prefix: a prune must never launder
            # a broken chain or a moved anchor into a fresh, chained anchor.
            v = ChainVerifier(int(anchor["sequence"]), bytes(anchor["hash"]))
            upto_hash = b""
            with conn.cursor(name="tessera_audit_prune") as cur:
                cur.itersize = 2000
                cur.execute("SELECT * FROM audit_log ORDER BY sequence")
                for record in cur:
                    prev = v.last_hash
                    row = AuditRow(int(record["sequence"]), entry_from_row(record),
                                   bytes(record["hash"]))
                    if not v.feed(row):
                        break
                    if row.sequence <= upto:
                        upto_hash = row.hash
                        if out is not None:
                            out.write(json.dumps(row.to_json(prev), separators=(",", ":"))
                                      + "\n")
            verdict = v.finish(v.last_sequence, v.last_hash)
            if not verdict.ok or not upto_hash:
                raise FailedPrecondition(
                    f"the audit chain does not verify at record {verdict.first_bad_sequence} "
                    f"({verdict.message}); nothing was pruned", reason="AUDIT_CHAIN_BROKEN")
            if out is not None:
                _sync(out)
            conn.execute("UPDATE audit_anchor SET sequence = %s, hash = %s, pruned_at = now()"
                         " WHERE id = 1", (upto, upto_hash))
            deleted = conn.execute("DELETE FROM audit_log WHERE sequence <= %s", (upto,))
            # The anchor joins the chain: moving the anchor row later is then detected.
            # Last, so the head stays locked (against the writers) only until the commit.
            conn.execute("SELECT tessera_audit_append(%b::bytea[])",
                         ([payload(prune_entry(dt.datetime.now(dt.UTC), upto, upto_hash))],),
                         binary=True)
            return PruneResult(deleted.rowcount, upto, export)
    except BaseException:
        if out is not None and export is not None:
            # Nothing was deleted, so a partial export would only mislead.
            out.close()
            export.unlink(missing_ok=True)
        raise
    finally:
        if out is not None:
            out.close()


def _sync(out: IO[str]) -> None:
    """The export is on disk before the rows it holds are deleted."""
    out.flush()
    os.fsync(out.fileno())

