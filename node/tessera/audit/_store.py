"""The audit tables in PostgreSQL: append a batch, list, verify."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from tessera.audit._chain import AuditRow, ChainVerifier, Verdict, entry_from_row
from tessera.store import Pool

log = logging.getLogger(__name__)
#: Rows fetched per round trip while verifying.
_VERIFY_FETCH = 2000
#: Records committed with their effects are linked within seconds; older unlinked ones
#: mean no writer is linking them (or someone inserted them by hand).
UNLINKED_GRACE_S = 60


async def append(conn: psycopg.AsyncConnection[Any], payloads: Sequence[bytes]) -> int:
    """Chain and insert one batch of payloads; returns the last sequence once committed.

    The pool's connections are in autocommit mode, so the one statement is its own
    transaction and has committed (synchronously, see migration 0003) when it returns.
    """
    # Binary parameters: the payloads travel as raw bytes, not hex text.
    cur = await conn.execute("SELECT tessera_audit_append(%b::bytea[]) AS last",
                             (list(payloads),), binary=True)
    row = await cur.fetchone()
    if not conn.autocommit:
        await conn.commit()
    return int(row["last"]) if row else 0


async def link_pending(conn: psycopg.AsyncConnection[Any]) -> None:
    """Chain the records committed with effects, so a listing shows every answered call.

    Costs one EXISTS probe when there is nothing to link. A failure leaves them for the
    writer (and for verification to flag, if they stay).
    """
    try:
        await conn.execute("SELECT tessera_audit_append(ARRAY[]::bytea[])")
    except psycopg.OperationalError:
        raise  # the database is unreachable: the call answers UNAVAILABLE
    except psycopg.Error as exc:
        log.warning("audit records not linked before listing: %s", type(exc).__name__)


def row_of(record: dict[str, Any]) -> AuditRow:
    """An AuditRow from an audit_log row."""
    return AuditRow(int(record["sequence"]), entry_from_row(record), bytes(record["hash"]))


@dataclass(frozen=True)
class AuditFilter:
    """What ListAuditRecords selects."""

    peer: str = ""
    grant: str = ""
    outcome: str = ""
    start: dt.datetime | None = None
    end: dt.datetime | None = None


def _where(f: AuditFilter) -> tuple[list[sql.Composable], list[Any]]:
    where: list[sql.Composable] = []
    params: list[Any] = []
    for column, value in (("peer", f.peer), ("grant_name", f.grant), ("outcome", f.outcome)):
        if value:
            where.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
            params.append(value)
    if f.start is not None:
        where.append(sql.SQL("time >= %s"))
        params.append(f.start)
    if f.end is not None:
        where.append(sql.SQL("time < %s"))
        params.append(f.end)
    return where, params


async def list_rows(pool: Pool, f: AuditFilter, *, after: int, limit: int,
                    newest_first: bool = False, before: int | None = None) -> list[AuditRow]:
    """Rows matching `f` with sequence > `after` (and < `before`), oldest first, or newest
    first with `newest_first`."""
    where, params = _where(f)
    where.append(sql.SQL("sequence > %s"))
    params.append(after)
    if before is not None:
        where.append(sql.SQL("sequence < %s"))
        params.append(before)
    order = sql.SQL("DESC" if newest_first else "ASC")
    query = sql.SQL("SELECT * FROM audit_log WHERE {} ORDER BY sequence {} LIMIT %s").format(
        sql.SQL(" AND ").join(where), order)
    params.append(limit)
    async with pool.connection() as conn:
        await link_pending(conn)
        cur = await conn.execute(query, params)
        return [row_of(r) for r in await cur.fetchall()]


async def count_rows(pool: Pool, f: AuditFilter, *, after: int = 0) -> int:
    """How many rows match `f` (with sequence > `after`)."""
    where, params = _where(f)
    where.append(sql.SQL("sequence > %s"))
    params.append(after)
    query = sql.SQL("SELECT count(*) FROM audit_log WHERE {}").format(
        sql.SQL(" AND ").join(where))
    async with pool.connection() as conn:
        cur = await conn.execute(query, params)
        row = await cur.fetchone()
    return int(row["count"]) if row is not None else 0


async def verify_log(pool: Pool) -> Verdict:
    """Check every row, the chain from the prune anchor to the head, and that the anchor is
    the one the newest prune record chained, in one snapshot."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        cur = await conn.execute("SELECT sequence, hash FROM audit_anchor WHERE id = 1")
        anchor = await cur.fetchone()
        cur = await conn.execute("SELECT sequence, hash FROM audit_head WHERE id = 1")
        head = await cur.fetchone()
        if anchor is None or head is None:
            return Verdict(False, 0, 0, "the audit chain's anchor or head row is missing")
        v = ChainVerifier(int(anchor["sequence"]), bytes(anchor["hash"]))
        async with conn.cursor(name="tessera_audit_verify") as rows:
            rows.itersize = _VERIFY_FETCH
            # Every row still in the table, those at or before the anchor included: a row
            # there means the anchor was moved over it (ChainVerifier reports it).
            await rows.execute("SELECT * FROM audit_log ORDER BY sequence")
            async for record in rows:
                if not v.feed(row_of(record)):
                    break
        verdict = v.finish(int(head["sequence"]), bytes(head["hash"]))
        cur = await conn.execute(
            "SELECT count(*) AS n, min(written_at) AS oldest FROM audit_unlinked"
            " WHERE written_at < now() - make_interval(secs => %s)", (UNLINKED_GRACE_S,))
        unlinked = await cur.fetchone()
        if verdict.ok and unlinked is not None and unlinked["n"]:
            return Verdict(False, verdict.checked, int(head["sequence"]) + 1, (
                f"{unlinked['n']} audit records committed with their effects were never "
                f"linked into the chain (the oldest from {unlinked['oldest'].isoformat()}); "
                "a running node links them within seconds"))
        return verdict
