"""`AdminService.Reload`, `tessera reload` and SIGHUP against real nodes.

Real processes throughout: `tessera serve` with two serving processes, PostgreSQL,
Valkey. Each check opens fresh connections (one per channel), so the kernel spreads them
over both serving processes, and reads each process's own metrics to prove both answered
(see test_workers.py): a limit that only one process applied cannot pass.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from tessera.core.paths import CredentialFiles, NodePaths
from tessera.pki import DevCA, SpiffeId
from tessera_client.pb import admin_pb2, admin_pb2_grpc, query_pb2, query_pb2_grpc, resources_pb2
from tests.fixtures.calls import reason_of
from tests.fixtures.nodes import NodeFactory, NodeProcess
from tests.fixtures.peers import Peering
from tests.fixtures.valkey import free_port
from tests.fixtures.waiting import wait_until
from tests.fixtures.workers import (
    CONNECTIONS,
    credentials,
    fresh_channel,
    per_worker,
    served_serial,
    serving,
)

_CLIENT = "spiffe://tessera.local/client/local"
_OLD = 'read=1000/2000'
_NEW = 'read=0.001/3'


def _config(path: Path, local_limits: str, extra: str = "") -> None:
    path.write_text(f'[ratelimit]\nlocal_limits = "{local_limits}"\n{extra}')


def _node(node_factory: NodeFactory, tmp_path: Path, workers: int = 2) -> tuple[NodeProcess,
                                                                                 Path]:
    cfg = tmp_path / "tessera.toml"
    _config(cfg, _OLD)
    env = {"TESSERA_CONFIG": str(cfg), "TESSERA_NODE_WORKERS": str(workers),
           "TESSERA_METRICS_LISTEN_ADDRESS": f"127.0.0.1:{free_port()}"}
    return node_factory(env=env), cfg


@asynccontextmanager
async def _fresh(node: NodeProcess, who: str = "admin") -> AsyncIterator[grpc.aio.Channel]:
    async with fresh_channel(node.address, credentials(node, who)) as channel:
        yield channel


async def _read_limits(node: NodeProcess) -> set[tuple[float, int]]:
    """The client identity's read limit as each of `CONNECTIONS` fresh connections'
    serving process has it."""
    seen = set()
    for _ in range(CONNECTIONS):
        async with _fresh(node) as ch:
            st = await admin_pb2_grpc.AdminServiceStub(ch).GetRateLimitStatus(
                admin_pb2.GetRateLimitStatusRequest(subject=_CLIENT), timeout=30)
        read = next(lim.limit for lim in st.limits if lim.method_class == "read")
        seen.add((read.rate_per_s, read.burst))
    return seen


async def _every_worker_reads(node: NodeProcess, expected: tuple[float, int]) -> None:
    """Every serving process answers with `expected` as the read limit (and both answered)."""
    before = per_worker(node, "GetRateLimitStatus")
    assert await _read_limits(node) == {expected}
    after = per_worker(node, "GetRateLimitStatus")
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


async def _reload(node: NodeProcess) -> admin_pb2.ReloadResponse:
    async with node.client("admin") as admin:
        resp: admin_pb2.ReloadResponse = await admin.admin.Reload(admin_pb2.ReloadRequest())
    return resp


async def test_reload_applies_a_new_rate_limit_on_every_worker_and_refuses_a_broken_file(
    node_factory: NodeFactory, tmp_path: Path,
) -> None:
    node, cfg = _node(node_factory, tmp_path)
    pids = sorted(node.serving_pids)
    await _every_worker_reads(node, (1000.0, 2000))

    _config(cfg, _NEW)
    resp = await _reload(node)
    assert list(resp.reloaded[:1]) == ["ratelimit.local_limits"]
    assert "deny_list" in resp.reloaded and "certificate_files" in resp.reloaded
    assert list(resp.not_reloaded) == []
    assert resp.processes_applied == 2 and list(resp.processes_missing) == []
    await _every_worker_reads(node, (0.001, 3))

    # The new limit is enforced by both processes: 3 reads for the node, then refusals
    # from each (Valkey's state is shared, so the burst is the node's).
    before = per_worker(node, "GetResource", "ResourceExhausted")
    admitted = 0
    for _ in range(CONNECTIONS):
        async with _fresh(node, "client") as ch:
            try:
                await query_pb2_grpc.QueryServiceStub(ch).GetResource(
                    query_pb2.GetResourceRequest(key=resources_pb2.ResourceKey(
                        workspace="w", kind="note", id="missing")), timeout=30)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.NOT_FOUND:
                    admitted += 1
                else:
                    assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, exc
    assert admitted == 3
    after = per_worker(node, "GetResource", "ResourceExhausted")
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)

    # A file that does not load is refused as a whole, naming the setting; nothing changes.
    _config(cfg, "read=abc", "[log]\nlevel = \"DEBUG\"\n")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _reload(node)
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(refused.value) == "CONFIG_INVALID"
    assert "ratelimit.local_limits" in (refused.value.details() or "")
    await _every_worker_reads(node, (0.001, 3))

    # A setting that needs a restart is reported, the reloadable ones still applied.
    _config(cfg, "read=500/600", "[store]\npool_max = 7\n")
    resp = await _reload(node)
    assert list(resp.reloaded[:1]) == ["ratelimit.local_limits"]
    assert [s.partition(":")[0] for s in resp.not_reloaded] == ["store.pool_max"]
    assert "restart" in resp.not_reloaded[0]
    await _every_worker_reads(node, (500.0, 600))

    # The CLI says the same, in the one JSON style.
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "tessera.cli", "reload", "--json",
                         "--data-dir", str(node.data_dir)],
        env=node.env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["processes_applied"] == 2
    assert body["not_reloaded"][0].startswith("store.pool_max:")
    assert sorted(node.serving_pids) == pids  # nothing restarted
    assert node.stop() == 0


async def test_reload_is_for_admins_only_and_audited(
    node_factory: NodeFactory, tmp_path: Path, peering: Peering,
) -> None:
    node, _ = _node(node_factory, tmp_path, workers=1)
    peer = await peering.link(node, "p1", kinds=["note"], workspaces=["*"])
    for who, client in (("peer", peer), ("client", node.client("client"))):
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await client.admin.Reload(admin_pb2.ReloadRequest())
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED, who
        if who == "client":
            await client.close()
    resp = await _reload(node)
    assert resp.processes_applied == 1
    async with node.client("admin") as admin:
        records = (await admin.admin.ListAuditRecords(
            admin_pb2.ListAuditRecordsRequest(newest_first=True, page_size=100))).records
    reloads = [(r.identity.rsplit("/", 2)[-2], r.status_code) for r in records
               if r.method == "Reload"]
    assert sorted(reloads) == [("admin", "OK"), ("client", "PERMISSION_DENIED"),
                               ("node", "PERMISSION_DENIED")], reloads


async def test_sighup_reloads_every_worker_and_a_restarted_worker_keeps_the_reload(
    node_factory: NodeFactory, tmp_path: Path,
) -> None:
    node, cfg = _node(node_factory, tmp_path)
    await _every_worker_reads(node, (1000.0, 2000))
    _config(cfg, _NEW)
    assert node.proc is not None
    node.proc.send_signal(signal.SIGHUP)

    async def applied() -> bool:
        return await _read_limits(node) == {(0.001, 3)}

    await wait_until(applied, "both serving processes applied the SIGHUP reload")
    await _every_worker_reads(node, (0.001, 3))
    assert node.proc.poll() is None  # SIGHUP does not stop the node

    # A serving process restarted after a crash starts with the reloaded settings.
    victim = node.serving_pids[1]
    os.kill(victim, signal.SIGKILL)

    def back() -> bool:
        c = serving(node)[1]
        return bool(c.get("running") and c.get("pid") != victim and c.get("metrics_port"))

    await wait_until(back, "the killed serving process restarted", timeout_s=60)

    async def both_up() -> bool:
        try:
            await _every_worker_reads(node, (0.001, 3))
        except (AssertionError, grpc.aio.AioRpcError):  # not back yet, or still the old
            return False
        return True

    await wait_until(both_up, "both serving processes answer with the reloaded limit",
                     timeout_s=60)
    assert node.stop() == 0


async def test_reload_serves_replaced_certificate_files_on_every_worker(
    node_factory: NodeFactory, tmp_path: Path,
) -> None:
    # The node's first start makes its development CA; it then serves fixed files
    # (tls.cert_file), which an operator replaces and reloads.
    node, _ = _node(node_factory, tmp_path)
    tls = tmp_path / "tls"
    tls.mkdir()
    for name in ("node.crt", "node.key", "ca.crt"):
        shutil.copy(node.pki / name, tls / name)
    assert node.stop() == 0
    node.env.update(TESSERA_TLS_CERT_FILE=str(tls / "node.crt"),
                    TESSERA_TLS_KEY_FILE=str(tls / "node.key"),
                    TESSERA_TLS_CA_FILE=str(tls / "ca.crt"))
    node.start()
    old = served_serial(node)
    ca = DevCA(NodePaths(node.data_dir).dev_ca, "tessera.local")
    files = CredentialFiles(tls / "node.crt", tls / "node.key", tls / "ca.crt")

    # Another identity in the files is refused; the old certificate stays.
    await asyncio.to_thread(ca.issue_files, files, SpiffeId.parse(
        "spiffe://tessera.local/node/other"), ttl=timedelta(hours=1),
        dns_names=("localhost",), ip_addresses=("127.0.0.1",))
    resp = await _reload(node)
    assert [s.partition(":")[0] for s in resp.not_reloaded] == ["certificate_files"]
    assert "identity" in resp.not_reloaded[0]
    assert {served_serial(node) for _ in range(CONNECTIONS)} == {old}

    issued = await asyncio.to_thread(ca.issue_files, files, SpiffeId.parse(
        "spiffe://tessera.local/node/tessera"), ttl=timedelta(hours=1),
        dns_names=("localhost",), ip_addresses=("127.0.0.1",))
    new = x509.load_pem_x509_certificates(issued.chain_pem)[0].serial_number
    resp = await _reload(node)
    assert "certificate_files" in resp.reloaded and list(resp.not_reloaded) == []
    assert resp.processes_applied == 2
    before = per_worker(node, "GetNodeInfo")
    serials = set()
    for _ in range(CONNECTIONS):
        serials.add(await asyncio.to_thread(served_serial, node))
        async with _fresh(node) as ch:
            await admin_pb2_grpc.AdminServiceStub(ch).GetNodeInfo(admin_pb2.GetNodeInfoRequest(),
                                                                  timeout=30)
    assert serials == {new}
    after = per_worker(node, "GetNodeInfo")
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    assert node.stop() == 0
