"""`tessera status`: is the node of this data directory running, and how is it doing.

One screen: running or not (and how to start it), pid, address, identity, uptime, serving
processes, tier; its health (AdminService.Doctor, worst first), certificate expiry,
peers calling in and peers joined, and the last errors (restarted children, failed
renewals, checks that are not green). Exit status: 0 running and healthy, 1 running with
a red check, 3 not running (as `systemctl status`).
"""

from __future__ import annotations

from typing import Any

from tessera.app import read_status
from tessera.cli._client import NoNode, local_node, node_state
from tessera.cli._command import Command, Env
from tessera.cli._output import enum_name, human_delta, human_when
from tessera.core.errors import Unavailable
from tessera.core.paths import NodePaths
from tessera_client.pb import admin_pb2

_NOT_RUNNING = 3
_LEVELS = {"GREEN": 0, "YELLOW": 1, "RED": 2}


def _status(env: Env) -> int:
    out, data_dir = env.out, env.data_dir
    try:
        state = node_state(data_dir)
    except NoNode:
        report: dict[str, Any] = {"running": False, "data_dir": data_dir,
                                  "reason": "no node.json: no node serves on this directory",
                                  "start": f"tessera serve --data-dir {data_dir}"}
        out.result(report, lambda: out.line(
            f"not running: no node serves on {data_dir}; start it with "
            f"`tessera serve --data-dir {data_dir}`"))
        return _NOT_RUNNING
    except Unavailable as exc:  # stale node.json, or a node that does not answer
        why = exc.message
        report = {"running": False, "data_dir": data_dir, "reason": why,
                  "start": f"tessera serve --data-dir {data_dir}"}
        out.result(report, lambda: out.line(f"not running: {why}"))
        return _NOT_RUNNING
    node = local_node(data_dir)
    with node.client() as c:
        info = c.admin.GetNodeInfo(admin_pb2.GetNodeInfoRequest(), timeout=10)
        checks = c.admin.Doctor(admin_pb2.DoctorRequest(), timeout=30).checks
        cert = c.admin.GetCertificateStatus(admin_pb2.GetCertificateStatusRequest(),
                                            timeout=10)
        peers = c.admin.ListPeers(admin_pb2.ListPeersRequest(page_size=1000), timeout=10)
    children: dict[str, Any] = (read_status(NodePaths(data_dir)) or {}).get("children", {})
    health = max((enum_name(admin_pb2.DoctorCheck.Status, ch.status) for ch in checks),
                 key=lambda s: _LEVELS.get(s, 0), default="GREEN")
    inbound: dict[str, int] = {}
    for p in peers.peers:
        name = enum_name(admin_pb2.PeerState, p.state).lower()
        inbound[name] = inbound.get(name, 0) + 1
    errors = [f"{ch['label']} restarted {ch['restarts']}x (last: {ch['last_exit']})"
              for ch in children.values() if ch.get("restarts")]
    errors += [f"certificate renewal: {cert.last_error}"] if cert.last_error else []
    errors += [f"joined peer {j.name}: {j.last_error}" for j in peers.joined if j.last_error]
    errors += [f"{ch.name}: {ch.message}" for ch in checks
               if enum_name(admin_pb2.DoctorCheck.Status, ch.status) != "GREEN"]
    uptime_s = 0.0
    if info.HasField("start_time"):
        from datetime import UTC, datetime

        uptime_s = (datetime.now(UTC) - info.start_time.ToDatetime(tzinfo=UTC)).total_seconds()
    report = {
        "running": True, "data_dir": data_dir, "pid": state.get("pid"),
        "address": state.get("address"), "identity": info.identity.uri,
        "version": info.version, "tier": info.tier, "start_time": info.start_time,
        "uptime_s": round(uptime_s), "workers": len(state.get("serving_pids", [])),
        "serving_pids": state.get("serving_pids", []), "health": health,
        "certificate": cert, "peers_in": inbound, "peers_out": [j.name for j in peers.joined],
        "errors": errors,
    }

    def human() -> None:
        rows = [
            ("status", f"running (pid {state.get('pid')})"),
            ("identity", info.identity.uri),
            ("address", str(state.get("address"))),
            ("data dir", str(data_dir)),
            ("uptime", human_delta(uptime_s) if uptime_s else "-"),
            ("workers", f"{report['workers']} serving process"
                        f"{'es' if report['workers'] != 1 else ''}"),
            ("tier", info.tier or "-"),
            ("version", info.version or "-"),
            ("health", health.lower()),
            ("certificate", f"{enum_name(admin_pb2.CertificateStatus.State, cert.state).lower()}"
                            f", expires {human_when(cert.not_after) or '-'}"
                            f", renews {human_when(cert.renew_time) or '-'}"),
            ("peers in", ", ".join(f"{n} {s}" for s, n in sorted(inbound.items())) or "none"),
            ("peers out", ", ".join(j.name for j in peers.joined) or "none"),
        ]
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            out.line(f"{k:<{width}}  {v}")
        out.line(f"{'last errors':<{width}}  " + ("none" if not errors else errors[0]))
        for e in errors[1:]:
            out.line(f"{'':<{width}}  {e}")

    out.result(report, human)
    return 1 if health == "RED" else 0


STATUS = Command("is the node running: pid, address, uptime, health, certificates, peers",
                 _status, json=True)
