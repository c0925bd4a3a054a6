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


def _agent_secrets(env: Env) -> None:
    """With agents allowed, refuse secrets kept outside the data directory that an agent
    could read: key files and the config file when it holds the DSN or Valkey URL."""
    import os
    import tomllib
    from pathlib import Path

    from tessera.commands import agent_identity, check_secrets_closed

    cfg = env.cfg
    if not cfg.agents.allow:
        return
    files = [("tls.key_file", cfg.tls.key_file),
             ("ca.provisioner_key_file", cfg.ca.provisioner_key_file),
             ("ca.provisioner_password_file", cfg.ca.provisioner_password_file)]
    source = env.args.config or os.environ.get("TESSERA_CONFIG")
    if source:
        try:
            table = tomllib.loads(Path(source).read_text())
        except (OSError, tomllib.TOMLDecodeError):
            table = {}  # config.load read it; a file gone meanwhile holds nothing
        for setting in ("store.dsn", "valkey.url"):
            section, _, key = setting.partition(".")
            value = table.get(section, {})
            if isinstance(value, dict) and value.get(key):
                files.append((f"the config file, which sets {setting}", str(source)))
                break
    check_secrets_closed(files, agent_identity(cfg.agents))


def _serve(env: Env) -> int:
    from tessera.app import serve

    cfg = env.cfg
    _agent_secrets(env)
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
