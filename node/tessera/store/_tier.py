"""Copying a node's database to another server (`tessera migrate-tier --to DSN`).

Every table of the schema except `schema_migrations` (the target is migrated to the same
version first) is copied in an order that satisfies its foreign keys: the source's rows
stream out with COPY into a temporary table on the target, then are upserted by primary
key, so a re-run copies only what changed and leaves the same result. Singleton rows the
migrations create (the audit chain's head and anchor, the event log's head) take the
source's values, which keeps the audit chain intact. Sequences are moved past the copied
ids.

The target must be empty (freshly migrated) or hold an earlier copy of this same source:
its audit head must be a row of the source's chain. Anything else is another node's data,
and the copy is refused before it writes anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from tessera.core.errors import FailedPrecondition

log = logging.getLogger(__name__)

#: Tables the copy leaves alone.
SKIPPED = frozenset({"schema_migrations"})


@dataclass
class TableCopy:
    """One table's numbers: rows in the source, rows in the target before and after."""

    name: str
    source_rows: int
    target_before: int
    target_after: int | None = None


@dataclass
class TierCopy:
    """The outcome of a copy (or of a dry run, which leaves `target_after` None)."""

    tables: list[TableCopy] = field(default_factory=list)
    dry_run: bool = False


@dataclass(frozen=True)
class _Table:
    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    #: Columns filled by an identity clause (need OVERRIDING SYSTEM VALUE).
    identity: bool


async def _tables(conn: psycopg.AsyncConnection[Any]) -> list[_Table]:
    """The public schema's tables in foreign-key order (referenced before referencing)."""
    cur = await conn.execute(
        "SELECT c.relname AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY c.relname")
    names = [str(r[0]) for r in await cur.fetchall() if r[0] not in SKIPPED]
    cur = await conn.execute(
        "SELECT cl.relname, rf.relname FROM pg_constraint co"
        " JOIN pg_class cl ON cl.oid = co.conrelid JOIN pg_class rf ON rf.oid = co.confrelid"
        " JOIN pg_namespace n ON n.oid = cl.relnamespace"
        " WHERE co.contype = 'f' AND n.nspname = 'public'")
    needs: dict[str, set[str]] = {n: set() for n in names}
    for child, parent in await cur.fetchall():
        if child in needs and parent != child:
            needs[child].add(parent)
    ordered: list[str] = []
    while needs:
        ready = sorted(n for n, deps in needs.items() if not deps - set(ordered))
        if not ready:  # a cycle: not in this schema; keep going in name order
            ready = sorted(needs)
        for n in ready:
            ordered.append(n)
            del needs[n]
    out: list[_Table] = []
    for name in ordered:
        cur = await conn.execute(
            "SELECT column_name, is_identity FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name = %s AND is_generated = 'NEVER'"
            " ORDER BY ordinal_position", (name,))
        cols = await cur.fetchall()
        cur = await conn.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a"
            " ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
            " WHERE i.indrelid = %s::regclass AND i.indisprimary", (f"public.{name}",))
        key = tuple(str(r[0]) for r in await cur.fetchall())
        out.append(_Table(name, tuple(str(c[0]) for c in cols), key,
                          any(c[1] == "YES" for c in cols)))
    return out


async def _count(conn: psycopg.AsyncConnection[Any], table: str) -> int:
    cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _check_target(source: psycopg.AsyncConnection[Any],
                        target: psycopg.AsyncConnection[Any]) -> None:
    """Refuse a target holding data that is not an earlier copy of this source."""
    cur = await target.execute("SELECT sequence, hash FROM audit_head WHERE id = 1")
    head = await cur.fetchone()
    if head is None or int(head[0]) == 0:
        if await _count(target, "resources") == 0:
            return
        raise FailedPrecondition(
            "the target database holds resources but no audit chain: it is not an earlier "
            "copy of this node; give an empty database", reason="TARGET_NOT_EMPTY")
    cur = await source.execute("SELECT hash FROM audit_log WHERE sequence = %s", (head[0],))
    row = await cur.fetchone()
    if row is None or bytes(row[0]) != bytes(head[1]):
        raise FailedPrecondition(
            "the target database holds another audit chain (another node's data); give an "
            "empty database or the one an earlier migrate-tier of this node filled",
            reason="TARGET_NOT_EMPTY")


async def _copy_table(source: psycopg.AsyncConnection[Any],
                      target: psycopg.AsyncConnection[Any], t: _Table) -> None:
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in t.columns)
    tmp = sql.Identifier(f"tessera_copy_{t.name}")
    await target.execute(sql.SQL(
        "CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA").format(
        tmp, cols, sql.Identifier(t.name)))
    async with source.cursor().copy(sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT").format(
            cols, sql.Identifier(t.name))) as out, \
            target.cursor().copy(sql.SQL("COPY {} ({}) FROM STDIN").format(tmp, cols)) as into:
        async for chunk in out:
            await into.write(chunk)
    overriding = sql.SQL(" OVERRIDING SYSTEM VALUE") if t.identity else sql.SQL("")
    if t.key:
        rest = [c for c in t.columns if c not in t.key]
        action: sql.Composable = (sql.SQL("DO UPDATE SET {}").format(sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in rest))
            if rest else sql.SQL("DO NOTHING"))
        conflict: sql.Composable = sql.SQL("ON CONFLICT ({}) {}").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in t.key), action)
    else:
        conflict = sql.SQL("ON CONFLICT DO NOTHING")
    await target.execute(sql.SQL("INSERT INTO {} ({}){} SELECT {} FROM {} {}").format(
        sql.Identifier(t.name), cols, overriding, cols, tmp, conflict))


async def _advance_sequences(target: psycopg.AsyncConnection[Any]) -> None:
    """Move every column-owned sequence past the largest id copied."""
    cur = await target.execute(
        "SELECT s.relname, t.relname, a.attname FROM pg_depend d"
        " JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'"
        " JOIN pg_class t ON t.oid = d.refobjid"
        " JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = d.refobjsubid"
        " JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = 'public'")
    for seq, table, column in await cur.fetchall():
        await target.execute(sql.SQL(
            "SELECT setval({}, greatest((SELECT coalesce(max({}), 0) FROM {}), 1))").format(
            sql.Literal(f"public.{seq}"), sql.Identifier(column), sql.Identifier(table)))


async def copy_database(source_dsn: str, target_dsn: str, *, dry_run: bool = False,
                        progress: Callable[[str], None] = lambda line: None) -> TierCopy:
    """Copy every table from source to target (migrated already) in one snapshot of the
    source and one transaction on the target; see the module docstring."""
    result = TierCopy(dry_run=dry_run)
    async with await psycopg.AsyncConnection.connect(source_dsn) as source, \
            await psycopg.AsyncConnection.connect(target_dsn) as target:
        await source.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        tables = await _tables(source)
        target_tables = {t.name for t in await _tables(target)}
        missing = [t.name for t in tables if t.name not in target_tables]
        if missing and not dry_run:
            raise FailedPrecondition(
                f"the target's schema lacks {', '.join(missing)}: migrate it to the "
                "source's version first", reason="SCHEMA_MISMATCH")
        if not missing:
            await _check_target(source, target)
        for t in tables:
            before = await _count(target, t.name) if t.name in target_tables else 0
            entry = TableCopy(t.name, await _count(source, t.name), before)
            result.tables.append(entry)
            if dry_run:
                progress(f"{t.name}: {entry.source_rows} rows to copy "
                         f"({entry.target_before} in the target now)")
                continue
            await _copy_table(source, target, t)
            entry.target_after = await _count(target, t.name)
            progress(f"{t.name}: {entry.source_rows} rows copied "
                     f"({entry.target_after - entry.target_before} new)")
        if dry_run:
            await target.rollback()
        else:
            await _advance_sequences(target)
            await target.commit()
        await source.rollback()
    return result
