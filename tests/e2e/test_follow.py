"""Following a peer's events between real nodes over real mTLS: resume, no gap, no duplicate,
and no re-sharing of a followed peer's events to another peer.

Absence is always proven by order, never by waiting: a stream is in sequence order, so a
sentinel (or a heartbeat whose cursor is the log head) arriving means every earlier event
has been decided.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import urllib.request

import grpc
import pytest

from tessera_client import AsyncClient
from tessera_client.pb import admin_pb2, events_pb2
from tests.fixtures.calls import put, reason_of
from tests.fixtures.events import event, opened, read_until, subscribe
from tests.fixtures.follow import (
    FAST,
    SUBJECT,
    follow,
    follows,
    head_heartbeat,
    linked,
    log_of,
    publish,
    wait_follow,
)
from tests.fixtures.nodes import NodeFactory, NodeProcess
from tests.fixtures.peers import Peering
from tests.fixtures.valkey import free_port
from tests.fixtures.waiting import wait_until


async def test_follower_resumes_after_either_side_restarts_without_gap_or_duplicate(
    node_factory: NodeFactory, peering: Peering,
) -> None:
    b = node_factory(name="b", env=FAST)
    a = node_factory(name="a", env=FAST)
    await linked(b, a, peering)
    await follow(a, "b", "task.*")
    await wait_follow(a, "b", "connected")

    first = await publish(b, 3, "first")
    assert [e.id for e in await log_of(a, "b", first[-1].id)] == [e.id for e in first]

    # A is down while B writes: on restart A resumes from its stored cursor.
    a.stop()
    while_a_down = await publish(b, 5, "a-down")
    a.start()
    got = await log_of(a, "b", while_a_down[-1].id)
    assert [e.id for e in got] == [e.id for e in first + while_a_down]
    assert {e.source for e in got} == {"b"}

    # B is down, then back on the same address: A reconnects by itself (backoff).
    b.listen = b.address
    b.stop()
    down = await wait_follow(a, "b", "backoff")
    assert down.last_error
    b.start()
    await wait_follow(a, "b", "connected")
    after_b = await publish(b, 4, "b-back")
    got = await log_of(a, "b", after_b[-1].id)
    assert [e.id for e in got] == [e.id for e in first + while_a_down + after_b]
    # Payloads, types, actors and origin times are B's.
    assert got[-1].data["tag"] == "b-back" and got[-1].type == "task.done"
    assert got[-1].time == after_b[-1].time and got[-1].actor == after_b[-1].actor

    state = (await follows(a))["b"]
    assert state.received == 12 and state.cursor == after_b[-1].cursor
    async with a.client("admin") as admin:
        checks = (await admin.admin.Doctor(admin_pb2.DoctorRequest())).checks
    follow_check = [c for c in checks if c.name == "follow:b"]
    assert follow_check and follow_check[0].status == admin_pb2.DoctorCheck.STATUS_GREEN
    done = await asyncio.to_thread(_cli, a, "events", "tail", "--origin", "b", "--from",
                                   "beginning", "--limit", "12", "--json")
    assert done.returncode == 0, done.stderr
    tailed = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["id"] for e in tailed] == [e.id for e in first + while_a_down + after_b]
    assert {e["source"] for e in tailed} == {"b"}
    done = await asyncio.to_thread(_cli, a, "doctor", "--json")
    shown = {c["name"]: c["status"] for c in json.loads(done.stdout)["checks"]}
    assert shown.get("follow:b") == "green", done.stdout


async def test_a_followed_peers_events_never_reach_another_peer_whatever_its_grant(
    node_factory: NodeFactory, peering: Peering,
) -> None:
    b = node_factory(name="b", env=FAST)
    a = node_factory(name="a", env=FAST)
    await linked(b, a, peering)
    await follow(a, "b")
    await wait_follow(a, "b", "connected")
    from_b = await publish(b, 3, "secret")
    await log_of(a, "b", from_b[-1].id)  # A holds them now

    # A grants C everything, C with the same subject's workspace and kind included.
    c: AsyncClient = await peering.link(a, "c", kinds=["task", "note"], workspaces=["*"],
                                        event_types=["*"], include_personal=True)
    async with a.client() as local:
        await local.command.Execute(put(*SUBJECT, team="core"))
        sentinel = (await local.events.Publish(event("task.done", subject=SUBJECT,
                                                     mine=1))).event
    b_ids = {e.id for e in from_b}

    ephemeral = subscribe(c, start=events_pb2.START_POSITION_BEGINNING)
    got = await read_until(ephemeral, lambda e: e.id == sentinel.id)
    ephemeral.cancel()
    assert not b_ids & {e.id for e in got} and {e.source for e in got} == {"a"}

    durable = subscribe(c, start=events_pb2.START_POSITION_BEGINNING, durable="c-sub")
    got = await read_until(durable, lambda e: e.id == sentinel.id)
    durable.cancel()
    assert not b_ids & {e.id for e in got} and {e.source for e in got} == {"a"}

    # Asking for B's origin by name gives C nothing: a heartbeat at the head proves it.
    only_b = c.events.Subscribe(events_pb2.SubscribeRequest(
        start=events_pb2.START_POSITION_BEGINNING, origins=["b"]))
    assert await opened(only_b)
    assert await head_heartbeat(only_b, sentinel.cursor) == []
    only_b.cancel()
    for origins in (["b", "local"], ["*"]):
        both = c.events.Subscribe(events_pb2.SubscribeRequest(
            start=events_pb2.START_POSITION_BEGINNING, origins=origins))
        got = await read_until(both, lambda e: e.id == sentinel.id)
        both.cancel()
        assert not b_ids & {e.id for e in got}, origins

    # A local identity of A sees them when it asks for them (by name, or "*"); without an
    # origins filter it gets A's own events only, as before following existed.
    mine = await log_of(a, "b", from_b[-1].id)
    assert [e.id for e in mine] == [e.id for e in from_b]
    async with a.client() as local:
        call = local.events.Subscribe(events_pb2.SubscribeRequest(
            start=events_pb2.START_POSITION_BEGINNING))
        own = await read_until(call, lambda e: e.id == sentinel.id)
        call.cancel()
        call = local.events.Subscribe(events_pb2.SubscribeRequest(
            start=events_pb2.START_POSITION_BEGINNING, origins=["*"]))
        every = await read_until(call, lambda e: e.id == sentinel.id)
        call.cancel()
    assert not b_ids & {e.id for e in own}
    assert b_ids <= {e.id for e in every}


def _cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tessera.cli", *args, "--data-dir", str(node.data_dir)],
        env=node.env, capture_output=True, text=True, timeout=60, check=False)


async def test_unfollow_then_forget_deletes_the_peers_events_and_is_audited(
    node_factory: NodeFactory, peering: Peering,
) -> None:
    b = node_factory(name="b", env=FAST)
    a = node_factory(name="a", env=FAST)
    await linked(b, a, peering)
    await follow(a, "b")
    await wait_follow(a, "b", "connected")
    from_b = await publish(b, 4, "forget-me")
    await log_of(a, "b", from_b[-1].id)

    async with a.client("admin") as admin:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin.admin.ForgetPeer(admin_pb2.ForgetPeerRequest(name="b"))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason_of(refused.value) == "PEER_FOLLOWED"
    done = await asyncio.to_thread(_cli, a, "peers", "unfollow", "b")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["enabled"] is False
    done = await asyncio.to_thread(_cli, a, "peers", "forget", "b")
    assert done.returncode == 0, done.stderr
    assert int(json.loads(done.stdout)["deleted"]) == 4

    async with a.client() as local:
        head = (await local.events.Publish(event("task.done", mine=1))).event
        call = local.events.Subscribe(events_pb2.SubscribeRequest(
            start=events_pb2.START_POSITION_BEGINNING, origins=["b"]))
        assert await opened(call)
        assert await head_heartbeat(call, head.cursor) == []
        call.cancel()
    async with a.client("admin") as admin:
        records = await admin.admin.ListAuditRecords(admin_pb2.ListAuditRecordsRequest(
            page_size=100))
    methods = [r.method for r in records.records]
    assert "ForgetPeer" in methods and "UnfollowPeer" in methods and "FollowPeer" in methods


def _gauges(mport: int) -> tuple[float, float]:
    """(tessera_follow_connected, tessera_follow_standby) for peer b of one process."""
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = {"connected": 0.0, "standby": 0.0}
    for line in text.splitlines():
        for key in found:
            if line.startswith(f'tessera_follow_{key}{{peer="b"}} '):
                found[key] = float(line.rsplit(" ", 1)[1])
    return found["connected"], found["standby"]


async def _wait_gauges(ports: list[int], want: list[tuple[float, float]]) -> None:
    """Until each process shows (connected, standby) as wanted, in any order of processes."""
    async def reached() -> bool:
        got = [await asyncio.to_thread(_gauges, p) for p in ports]
        return sorted(got) == sorted(want)

    await wait_until(reached, f"(connected, standby) per process to be {want}")


async def test_one_follower_per_peer_across_replicas_and_the_other_takes_over(
    node_factory: NodeFactory, peering: Peering,
) -> None:
    b = node_factory(name="b", env=FAST)
    ports = [free_port(), free_port()]
    a = node_factory(name="a", env={**FAST, "TESSERA_METRICS_LISTEN_ADDRESS":
                                    f"127.0.0.1:{ports[0]}"})
    a2 = node_factory(name="a", env={**FAST, "TESSERA_STORE_DSN": a.env["TESSERA_STORE_DSN"],
                                     "TESSERA_METRICS_LISTEN_ADDRESS": f"127.0.0.1:{ports[1]}"})
    await linked(b, a, peering)
    shutil.copytree(a.data_dir / "peers", a2.data_dir / "peers", dirs_exist_ok=True)
    await follow(a, "b")
    await wait_follow(a, "b", "connected")
    # Both processes want to follow b; the advisory lock lets exactly one, the other waits.
    await _wait_gauges(ports, [(1.0, 0.0), (0.0, 1.0)])
    first = await publish(b, 10, "replicas")
    assert [e.id for e in await log_of(a2, "b", first[-1].id)] == [e.id for e in first]
    counts = [await asyncio.to_thread(_gauges, p) for p in ports]
    assert sorted(counts) == [(0.0, 1.0), (1.0, 0.0)]

    # The holder goes away: the other process takes the lock and carries on from the cursor.
    holder, other, other_port = ((a, a2, ports[1]) if counts[0] == (1.0, 0.0)
                                 else (a2, a, ports[0]))
    holder.stop()
    await _wait_gauges([other_port], [(1.0, 0.0)])
    more = await publish(b, 5, "after-failover")
    got = await log_of(other, "b", more[-1].id)
    assert [e.id for e in got] == [e.id for e in first + more]


async def test_a_refused_follow_records_why_backs_off_and_recovers_when_granted_again(
    node_factory: NodeFactory, peering: Peering,
) -> None:
    b = node_factory(name="b", env=FAST)
    a = node_factory(name="a", env=FAST)
    await linked(b, a, peering)
    await follow(a, "b")
    await wait_follow(a, "b", "connected")
    before = await publish(b, 2, "before")
    await log_of(a, "b", before[-1].id)

    async with b.client("admin") as admin:
        grants = (await admin.admin.ListGrants(admin_pb2.ListGrantsRequest(peer="a"))).grants
        for g in grants:
            await admin.admin.RevokeGrant(admin_pb2.RevokeGrantRequest(name=g.name))
    refused = await wait_follow(a, "b", "backoff")
    assert "PERMISSION_DENIED" in refused.last_error or "UNAUTHENTICATED" in refused.last_error
    while_refused = await publish(b, 3, "while-refused")

    await peering.grant(b, "a", kinds=["task"], workspaces=["acme"], event_types=["task.*"])
    await wait_follow(a, "b", "connected")
    got = await log_of(a, "b", while_refused[-1].id)
    # Resumed from its cursor: what was published while it was refused arrives, once.
    assert [e.id for e in got] == [e.id for e in before + while_refused]
