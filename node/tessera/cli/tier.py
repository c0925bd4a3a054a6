"""`tessera migrate-tier --to DSN`: move a node's data to an external PostgreSQL.

The node must be stopped (the data directory's lock is taken, so a running node refuses
it). The source is the node's database: the embedded PostgreSQL, started here, or
store.dsn. The target is migrated to the same schema version, then every table is copied
in one snapshot (see `tessera.store.copy_database`); a re-run copies what changed since.
Afterwards the doctor's PostgreSQL checks run against both ends, the row counts are
compared and the audit chain is verified on the target. No password is ever printed.
"""

from __future__ import annotations

import argparse
import asyncio

from tessera import audit, doctor, store
from tessera.app import DataDirLock, prepare_data_dir
from tessera.cli._command import Command, Env
from tessera.cli._output import Printer
from tessera.config import Config
from tessera.core.paths import NodePaths
from tessera.embedded import EmbeddedPostgres


def _flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", required=True, metavar="DSN",
                   help="the external database (postgresql://user:password@host/db)")
    p.add_argument("--dry-run", action="store_true",
                   help="say what would be copied; change nothing")


async def _checks(out: Printer, dsn: str, end: str) -> bool:
    ok = True
    for c in await doctor.check_postgres(dsn):
        out.line(f"{end}: {c.level.value:6} {c.name:12} {c.message}")
        ok = ok and c.level is not doctor.Level.RED
    return ok


def _migrate_tier(env: Env) -> int:
    return asyncio.run(_run(env.args, env.cfg, env.out))


async def _run(args: argparse.Namespace, cfg: Config, out: Printer) -> int:
    paths = NodePaths(cfg.node.data_dir)
    prepare_data_dir(paths)
    lock = DataDirLock(paths.lock_file)
    lock.acquire()  # DataDirInUse while the node runs: stop it first
    pg: EmbeddedPostgres | None = None
    try:
        source = cfg.store.dsn
        if not source:
            pg = EmbeddedPostgres(paths.pgdata)
            source = await asyncio.to_thread(pg.start)
        target: str = args.to
        out.line(f"source: {store.redact_dsn(source)}")
        out.line(f"target: {store.redact_dsn(target)}")
        if not (await _checks(out, source, "source")
                and await _checks(out, target, "target")):
            out.line("migrate-tier: fix the checks above first")
            return 1
        pool = await store.open_pool(cfg.store, source)
        try:
            version = await store.migrate(pool, cfg.store)
        finally:
            await pool.close()
        if not args.dry_run:
            pool = await store.open_pool(cfg.store, target)
            try:
                out.line(f"target: schema version {await store.migrate(pool, cfg.store)} "
                         f"(source {version})")
            finally:
                await pool.close()
        result = await store.copy_database(
            source, target, dry_run=args.dry_run,
            progress=lambda line: out.line(f"  {line}", flush=True))
        if args.dry_run:
            out.line("dry run: nothing was changed")
            return 0
        return await _verify(out, cfg, source, target, result)
    finally:
        if pg is not None:
            await asyncio.to_thread(pg.stop)
        lock.release()


async def _verify(out: Printer, cfg: Config, source: str, target: str,
                  result: store.TierCopy) -> int:
    """Both ends healthy, every table's rows in the target, the audit chain intact."""
    ok = await _checks(out, source, "source") and await _checks(out, target, "target")
    short = [t.name for t in result.tables
             if t.target_after is None or t.target_after < t.source_rows]
    if short:
        ok = False
        out.line(f"target: fewer rows than the source in {', '.join(short)}")
    pool = await store.open_pool(cfg.store, target)
    try:
        verdict = await audit.verify_log(pool)
    finally:
        await pool.close()
    if verdict.ok:
        out.line(f"target: audit chain verified ({verdict.checked} records)")
    else:
        ok = False
        out.line(f"target: audit chain does NOT verify at {verdict.first_bad_sequence}: "
                 f"{verdict.message}")
    if ok:
        out.line(f"migrate-tier: done; set store.dsn to {store.redact_dsn(target)} (with "
                 "its password) and start the node")
    return 0 if ok else 1


MIGRATE_TIER = Command("copy a stopped node's data to an external PostgreSQL", _migrate_tier,
                       flags=_flags)
