"""Several serving processes per node (`tessera serve --workers N`) on one port.

Real processes throughout: the supervisor, its serving processes, PostgreSQL, Valkey.
Connections are opened one per channel (a local subchannel pool), so the kernel's
SO_REUSEPORT hashing spreads them over the serving processes; each test reads every
serving process's own metrics to prove that all of them took part, so none passes by
luck with all connections on one process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import psycopg
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tessera_client.pb import (
    admin_pb2,
    admin_pb2_grpc,
    query_pb2_grpc,
)
from tests.fixtures.nodes import NodeFactory, NodeProcess
from tests.fixtures.pg import lock_waiters
from tests.fixtures.valkey import free_port
from tests.fixtures.waiting import wait_until
from tests.fixtures.workers import (
    CONNECTIONS,
    children,
    credentials,
    fresh_channel,
    get_note,
    handled,
    per_worker,
    put_note,
    scrape,
    served_serial,
    serving,
    workers_env,
)


def _node_metrics_port(node: NodeProcess) -> int:
    return int(node.env["TESSERA_METRICS_LISTEN_ADDRESS"].rpartition(":")[2])


async def _info_on_fresh_connections(node: NodeProcess, n: int = CONNECTIONS) -> None:
    creds = credentials(node, "admin")
    for _ in range(n):
        async with fresh_channel(node.address, creds) as ch:
            await admin_pb2_grpc.AdminServiceStub(ch).GetNodeInfo(
                admin_pb2.GetNodeInfoRequest(), timeout=30)


async def test_two_workers_share_one_port_and_one_scrape_shows_the_whole_node(
    node_factory: NodeFactory,
) -> None:
    node = node_factory(env=workers_env(2))
    pids = node.serving_pids
    assert len(set(pids)) == 2
    await _info_on_fresh_connections(node)
    counts = per_worker(node, "GetNodeInfo")
    assert all(n > 0 for n in counts), counts  # the kernel spread the connections
    assert sum(counts) == CONNECTIONS
    whole = scrape(_node_metrics_port(node))
    assert handled(whole, "GetNodeInfo") == CONNECTIONS
    assert whole[("tessera_serving_processes", (("state", "up"),))] == 2
    assert node.stop() == 0


def _start_expecting_failure(node: NodeProcess, listen: str, workers: int) -> str:
    """`tessera serve` on a taken port: it must exit non-zero; its output."""
    env = {**node.env, "TESSERA_NODE_WORKERS": str(workers)}
    env.pop("TESSERA_METRICS_LISTEN_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "tessera.cli", "serve", "--data-dir",
         str(node.data_dir.parent / f"second-{workers}"), "--listen", listen],
        env=env, capture_output=True, timeout=120, check=False)
    assert done.returncode != 0, done.stdout.decode() + done.stderr.decode()
    return (done.stdout + done.stderr).decode()


async def test_a_second_node_on_a_workers_port_is_refused_with_or_without_workers(
    node_factory: NodeFactory,
) -> None:
    node = node_factory(env=workers_env(2))
    for workers in (2, 1):
        out = _start_expecting_failure(node, node.address, workers)
        assert "node.listen_address" in out and "cannot listen on" in out, out
    # The first node still serves every connection itself.
    await _info_on_fresh_connections(node, 8)
    assert sum(per_worker(node, "GetNodeInfo")) == 8


async def test_a_workers_node_is_refused_a_port_a_single_process_node_holds(
    node_factory: NodeFactory,
) -> None:
    node = node_factory()  # one serving process, no SO_REUSEPORT
    out = _start_expecting_failure(node, node.address, 2)
    assert "node.listen_address" in out and "cannot listen on" in out, out


async def test_a_killed_worker_is_restarted_and_sigterm_stops_every_worker(
    node_factory: NodeFactory,
) -> None:
    node = node_factory(env=workers_env(2))
    victim = node.serving_pids[1]
    os.kill(victim, signal.SIGKILL)

    def back() -> bool:
        child = children(node).get("serving-1", {})
        state = json.loads((node.data_dir / "node.json").read_text())
        return bool(child.get("running") and child.get("pid") != victim
                    and child.get("restarts") == 1 and child["pid"] in state["serving_pids"])

    await wait_until(back, "the killed serving process restarted", timeout_s=60)
    pids = [c["pid"] for c in serving(node)]
    async with node.client() as c:
        await c.command.Execute(put_note("after-restart"))
    await _info_on_fresh_connections(node)
    assert all(n > 0 for n in per_worker(node, "GetNodeInfo"))
    assert node.stop() == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_local_rate_limit_fallback_gives_each_worker_its_share(
    node_factory: NodeFactory,
) -> None:
    # Valkey never answers (nothing listens there), so every decision is local: a burst
    # of 10 reads for the node, a refill too slow to matter (one per 1000 s).
    dead = f"redis://127.0.0.1:{free_port()}/0"
    node = node_factory(env=workers_env(2, TESSERA_VALKEY_URL=dead,
                                         TESSERA_RATELIMIT_LOCAL_LIMITS="read=0.001/10"))
    async with node.client() as c:
        await c.command.Execute(put_note("limited"))
    creds = credentials(node)
    admitted = refused = 0
    for _ in range(40):
        async with fresh_channel(node.address, creds) as ch:
            try:
                await query_pb2_grpc.QueryServiceStub(ch).GetResource(get_note("limited"),
                                                                      timeout=30)
                admitted += 1
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                refused += 1
    tried = [ok + no for ok, no in zip(per_worker(node, "GetResource"),
                                       per_worker(node, "GetResource", "ResourceExhausted"),
                                       strict=True)]
    # Each process saw more calls than its share, so each spent its whole share.
    assert all(n > 5 for n in tried), tried
    assert (admitted, refused) == (10, 30)


async def test_a_revoked_client_is_refused_by_every_worker(
    node_factory: NodeFactory,
) -> None:
    node = node_factory(env=workers_env(2))
    pem = ((node.pki / "client.crt").read_bytes(), (node.pki / "client.key").read_bytes())
    creds = credentials(node, pem=pem)
    async with fresh_channel(node.address, creds) as ch:  # accepted before the revocation
        with pytest.raises(grpc.aio.AioRpcError) as first:
            await query_pb2_grpc.QueryServiceStub(ch).GetResource(get_note("none"), timeout=30)
        assert first.value.code() is grpc.StatusCode.NOT_FOUND
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tessera.cli", "certs", "revoke", "--data-dir",
         str(node.data_dir), "--cert", str(node.pki / "client.crt"), "--decommission"],
        env=node.env, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    codes = set()
    for _ in range(CONNECTIONS):
        async with fresh_channel(node.address, creds) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await query_pb2_grpc.QueryServiceStub(ch).GetResource(get_note("none"),
                                                                      timeout=30)
            codes.add(info.value.code())
    assert codes == {grpc.StatusCode.UNAUTHENTICATED}
    refused = per_worker(node, "GetResource", "Unauthenticated")
    assert all(n > 0 for n in refused) and sum(refused) == CONNECTIONS, refused


async def test_rotate_certificate_through_one_worker_is_served_by_every_worker(
    node_factory: NodeFactory,
) -> None:
    node = node_factory(env=workers_env(2))
    before = served_serial(node)
    async with node.client("admin") as c:
        status = await c.admin.RotateCertificate(admin_pb2.RotateCertificateRequest(),
                                                 timeout=60)
    new = int(status.serial, 16)
    assert new != before
    expiry = x509.load_pem_x509_certificates(
        (node.pki / "node.crt").read_bytes())[0].not_valid_after_utc.timestamp()

    def every_worker_has_it() -> bool:
        return all(scrape(c["metrics_port"]).get(
            ("tessera_certificate_expiry_timestamp_seconds", ())) == expiry
            for c in serving(node))

    await wait_until(every_worker_has_it, "every serving process took the rotated certificate",
                     timeout_s=60)
    assert {served_serial(node) for _ in range(CONNECTIONS)} == {new}
    # Renewed once for the node: one process renewed, the other adopted the files.
    renewals = [scrape(c["metrics_port"]).get(
        ("tessera_certificate_renewals_total", (("identity", "node"), ("result", "ok"))), 0.0)
        for c in serving(node)]
    assert sorted(renewals) == [0.0, 1.0], renewals


def _lease_holders(dsn: str) -> list[int]:
    """Pids of the serving processes holding the node's jobs lease."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a"
            " ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted"
            " AND a.application_name LIKE 'tessera-lease tessera-node-jobs %'").fetchall()
    return [int(r[0].rpartition(" ")[2]) for r in rows]


async def test_pruning_runs_in_one_worker_and_moves_when_it_dies(
    node_factory: NodeFactory,
) -> None:
    node = node_factory(env=workers_env(2))
    dsn = node.env["TESSERA_STORE_DSN"]
    await wait_until(lambda: len(_lease_holders(dsn)) == 1,
                     "one serving process holds the jobs lease", timeout_s=60)
    holder = _lease_holders(dsn)[0]
    assert holder in node.serving_pids
    os.kill(holder, signal.SIGKILL)

    def moved() -> bool:
        holders = _lease_holders(dsn)
        alive = [c["pid"] for c in serving(node) if c["running"]]
        return len(holders) == 1 and holders[0] != holder and holders[0] in alive

    await wait_until(moved, "another serving process took the jobs lease", timeout_s=60)
    # Still exactly one, with both processes running again.
    await wait_until(lambda: all(c["running"] for c in serving(node)),
                     "the killed process is back", timeout_s=60)
    assert len(_lease_holders(dsn)) == 1


def test_workers_setting_is_checked_at_start(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tessera.cli", "serve", "--data-dir", str(tmp_path / "d"),
         "--workers", "many"], capture_output=True, timeout=60, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")})
    assert done.returncode == 2
    assert b"node.workers" in done.stdout + done.stderr


async def test_auto_workers_is_one_per_core(node_factory: NodeFactory) -> None:
    node = node_factory(env=workers_env(1, TESSERA_NODE_WORKERS="auto"))
    assert len(node.serving_pids) == len(os.sched_getaffinity(0))
    async with node.client() as c:
        await c.command.Execute(put_note("auto"))


async def test_sigterm_lets_calls_in_flight_on_every_worker_finish(
    node_factory: NodeFactory,
) -> None:
    # 16 connections: all on one of the two processes has p = 2**-15. Calls are held on a
    # table lock until both processes are draining, then released: every one answers.
    node = node_factory(env=workers_env(2, TESSERA_STORE_POOL_MAX="20",
                                         TESSERA_NODE_SHUTDOWN_GRACE_S="120",
                                         TESSERA_STORE_STATEMENT_TIMEOUT_S="120"))
    dsn = node.env["TESSERA_STORE_DSN"]
    async with node.client() as c:
        await c.command.Execute(put_note("held"))
    creds = credentials(node)
    channels = [grpc.aio.secure_channel(node.address, creds, options=[
        ("grpc.use_local_subchannel_pool", 1), ("grpc.ssl_target_name_override", "localhost")])
        for _ in range(16)]
    try:
        with psycopg.connect(dsn, autocommit=True) as watcher, psycopg.connect(dsn) as locker:
            locker.execute("LOCK TABLE resources IN ACCESS EXCLUSIVE MODE")
            calls = [asyncio.ensure_future(query_pb2_grpc.QueryServiceStub(ch).GetResource(
                get_note("held"), timeout=300)) for ch in channels]

            await wait_until(lambda: lock_waiters(watcher) == 16, "16 calls waiting on the lock",
                             timeout_s=60)
            pids = node.serving_pids
            assert node.proc is not None
            node.proc.send_signal(signal.SIGTERM)
            # Asked on each held call's own connection: its process is draining.
            for ch in channels:
                await apoll_not_serving(ch)
            locker.commit()
            results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        for ch in channels:
            await ch.close()
    failed = [r for r in results if isinstance(r, BaseException)]
    assert failed == [], failed
    assert node.proc.wait(60) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def apoll_not_serving(channel: grpc.aio.Channel) -> None:
    """Wait until the process behind this connection reports NOT_SERVING (or is gone)."""
    health = health_pb2_grpc.HealthStub(channel)

    async def draining() -> bool:
        try:
            r = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code() is grpc.StatusCode.UNAVAILABLE
        return r.status == health_pb2.HealthCheckResponse.NOT_SERVING

    await wait_until(draining, "a serving process began its graceful stop", timeout_s=60)
