"""`tessera serve` and `tessera migrate`: run the node, or only bring its schema up to date."""

from __future__ import annotations

import argparse
import asyncio

from tessera.cli._command import Command, Env
from tessera.observability import configure_logging


def _serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default=None, help="host:port to listen on (0 picks a port)")
    p.add_argument("--workers", default=None,
                   help="serving processes: a number, or 'auto' for one per core "
                        "(also node.workers; default 1)")
    p.add_argument("--log-format", choices=("text", "json"), default=None,
                   help="text (default) or json: one object per line (also TESSERA_LOG_FORMAT)")


def _serve(env: Env) -> int:
    from tessera.app import serve

    cfg = env.cfg
    # [log] may come from the file or the environment, so logging is set up again here.
    configure_logging(cfg.log.format, env.args.log_level, access=cfg.log.access)
    return asyncio.run(serve(cfg, log_level=env.args.log_level, source=env.config_source()))


def _migrate(env: Env) -> int:
    from tessera import store
    from tessera.app import database

    cfg = env.cfg

    async def run(dsn: str) -> int:
        pool = await store.open_pool(cfg.store, dsn)
        try:
            return await store.migrate(pool, cfg.store)
        finally:
            await pool.close()

    with database(cfg) as dsn:
        version = asyncio.run(run(dsn))
    env.out.line(f"schema at version {version}")
    return 0


SERVE = Command("run the node (embedded tier when nothing is configured)", _serve,
                flags=_serve_flags)
MIGRATE = Command("apply database migrations and exit", _migrate)
