"""`tessera doctor`: check PostgreSQL, pgvector, Valkey, certificates and the running node."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import grpc

from tessera import config, doctor
from tessera.cli._client import NoNode, local_node, node_state
from tessera.cli._command import Command, Env
from tessera.core.errors import ConfigError, Unavailable
from tessera.core.paths import NodePaths
from tessera.embedded import valkey_socket

_COLOURS = {doctor.Level.GREEN: "\033[32m", doctor.Level.YELLOW: "\033[33m",
            doctor.Level.RED: "\033[31m"}
_LEVELS = {1: doctor.Level.GREEN, 2: doctor.Level.YELLOW, 3: doctor.Level.RED}


async def _dependency_checks(cfg: config.Config) -> list[doctor.Check]:
    from tessera.app import running_dsn
    from tessera.pki import read_status

    paths = NodePaths(cfg.node.data_dir)
    url = cfg.valkey.url
    socket = valkey_socket(paths.valkey)
    if not url and socket is not None and socket.exists():
        url = f"unix://{socket}"
    if cfg.tls.cert_file:
        certificates = [("certificate", Path(cfg.tls.cert_file), Path(cfg.tls.key_file))]
        renewals = {}
    else:
        certificates = [("certificate", paths.server.cert, paths.server.key),
                        ("admin-certificate", paths.admin.cert, paths.admin.key)]
        # A running node writes its renewal state next to the certificate.
        renewals = {name: status for name, files in (("node", paths.server),
                                                     ("admin", paths.admin),
                                                     ("client", paths.client))
                    if (status := read_status(files)) is not None}
    checks = await doctor.check_dependencies(doctor.Dependencies(
        dsn=running_dsn(cfg), valkey_url=url, certificates=certificates, renewals=renewals,
        missing_dsn=f"the embedded PostgreSQL under {paths.pgdata} is not running; "
                    "start the node with `tessera serve` or set store.dsn",
        missing_valkey=f"the embedded Valkey under {paths.valkey} is not running; "
                       "start the node with `tessera serve` or set valkey.url"))
    if cfg.ca.url and not cfg.tls.cert_file:
        soonest = min((st.not_after for st in renewals.values()), default=None)
        checks.append(await _stepca_check(cfg, soonest))
    return checks + _node_checks(paths)


def _node_checks(paths: NodePaths) -> list[doctor.Check]:
    """The running node itself: a stale node.json is red; restarts of its children shown."""
    from tessera.app import read_status

    try:
        state = node_state(paths.data_dir)
    except NoNode:
        return []  # no node running: the dependency checks say what is missing
    except Unavailable as exc:
        return [doctor.Check("node", doctor.Level.RED, exc.message)]
    children: dict[str, Any] = (read_status(paths) or {}).get("children", {})
    message = f"supervisor pid {state['pid']} serving on {state.get('address')}"
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


async def _stepca_check(cfg: config.Config, soonest: dt.datetime | None) -> doctor.Check:
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


def _limiter_checks(cfg: config.Config) -> list[doctor.Check]:
    """The running node's own rate-limiter check (which backend decides), if it runs."""
    from tessera_client.pb import admin_pb2

    try:
        client = local_node(cfg.node.data_dir).client()
    except (Unavailable, OSError, KeyError):
        return []  # no node running: nothing to say about its limiter
    with client as c:
        try:
            resp = c.admin.Doctor(admin_pb2.DoctorRequest(), timeout=5)
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.UNAVAILABLE:
                # E.g. its PostgreSQL is down: the node says why in its answer.
                return [doctor.Check("node", doctor.Level.RED,
                                     f"the running node answers UNAVAILABLE: {exc.details()}")]
            return []
    return [doctor.Check(ch.name, _LEVELS.get(ch.status, doctor.Level.RED), ch.message,
                         {"backend": ch.details.fields["backend"].string_value}
                         if "backend" in ch.details.fields else {})
            # ... and each followed peer's follower (issue 14), as only the node knows it.
            for ch in resp.checks if ch.name == "ratelimit" or ch.name.startswith("follow:")]


def _doctor(env: Env) -> int:
    """Check dependencies; exit 1 on any red."""
    cfg = env.cfg
    checks = asyncio.run(_dependency_checks(cfg))
    checks += _limiter_checks(cfg)  # the running node's limiter: Valkey or its local fallback
    overall = doctor.worst(checks)

    def human() -> None:
        tty = env.out.out.isatty()
        for c in checks:
            mark = f"{_COLOURS[c.level]}{c.level.value:6}\033[0m" if tty else f"{c.level.value:6}"
            env.out.line(f"{mark} {c.name:26} {c.message}")
        env.out.line(f"overall: {overall.value}")

    env.out.result({"status": overall.value,
                    "checks": [{"name": c.name, "status": c.level.value, "message": c.message,
                                "details": c.details} for c in checks]}, human)
    return 1 if overall is doctor.Level.RED else 0


DOCTOR = Command("check PostgreSQL, pgvector, Valkey and certificates", _doctor, json=True)
