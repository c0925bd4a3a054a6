"""Event streams to peers, scoped by their grants, between real nodes over real mTLS.

Every "never delivers" check ends with a sentinel event the peer may see, published after
the events it may not: the stream is in sequence order, so once the sentinel arrives every
earlier event has been decided, and absence is proven without waiting for a timeout.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import urllib.request

import grpc
import pytest
from google.protobuf import timestamp_pb2

from tessera_client import AsyncClient
from tessera_client.pb import admin_pb2, events_pb2
from tests.fixtures.calls import put, reason_of
from tests.fixtures.events import WAIT_S, event, opened, publish_many, read_until, subscribe
from tests.fixtures.nodes import NodeFactory, NodeProcess
from tests.fixtures.peers import Peering
from tests.fixtures.valkey import free_port

#: B's data: (workspace, kind, id, team, owner).
SEED = [
    ("acme", "task", "t1", "core", "bob"),
    ("acme", "task", "t2", "ops", ""),
    ("acme", "task", "t3", "core", ""),
    ("acme", "task", "p1", "core", "ann"),  # ann's personal task
    ("acme", "note", "n1", "core", ""),
    ("acme", "credential", "c1", "core", ""),  # never shareable
    ("beta", "task", "x1", "core", ""),  # another workspace
    ("beta", "note", "x2", "core", ""),
]


@pytest.fixture
async def b(node_factory: NodeFactory) -> NodeProcess:
    node = node_factory(name="b")
    async with node.client() as c:
        for ws, kind, rid, team, owner in SEED:
            await c.command.Execute(put(ws, kind, rid, team=team, owner=owner))
    return node


def keyed(events: list[events_pb2.EventEnvelope]) -> list[tuple[str, str, str, str]]:
    return [(e.type, e.subject.workspace, e.subject.kind, e.subject.id) for e in events]


async def test_peer_gets_only_granted_types_in_its_workspace_with_a_subject(
    b: NodeProcess, peering: Peering,
) -> None:
    peer = await peering.link(b, "a", kinds=["task", "note"],
                              workspaces=["acme"], event_types=["task.*"])
    async with b.client() as local:
        await local.events.Publish(event("task.done", subject=("acme", "task", "t1"), ok=1))
        await local.events.Publish(event("task.done", ok=2))  # no subject: never to a peer
        await local.events.Publish(event("task.done", subject=("beta", "task", "x1"), ok=3))
        await local.events.Publish(event("note.shared", subject=("acme", "note", "n1")))
        sentinel = (await local.events.Publish(
            event("task.done", subject=("acme", "task", "t3"), ok=4))).event
    call = subscribe(peer, start=events_pb2.START_POSITION_BEGINNING)
    got = await read_until(call, lambda e: e.id == sentinel.id)
    call.cancel()
    assert keyed(got) == [
        ("task.put", "acme", "task", "t1"), ("task.put", "acme", "task", "t2"),
        ("task.put", "acme", "task", "t3"), ("task.put", "acme", "task", "p1"),
        ("task.done", "acme", "task", "t1"), ("task.done", "acme", "task", "t3"),
    ]
    # A resource event says only what GetResource would show the peer anyway.
    assert set(got[0].data.keys()) == {"version", "etag"}


async def test_team_and_personal_scopes_deliver_only_their_rows_events(
    b: NodeProcess, peering: Peering,
) -> None:
    peer = await peering.link(b, "a", kinds=["task"], workspaces=["acme"], teams=["core"],
                              subject_user="ann", include_personal=False, event_types=["*"])
    async with b.client() as local:
        # A later move of t2 into the team does not widen who saw its earlier events.
        await local.command.Execute(put("acme", "task", "t2", team="core", key="move"))
        sentinel = (await local.events.Publish(
            event("task.checked", subject=("acme", "task", "t3")))).event
    call = subscribe(peer, start=events_pb2.START_POSITION_BEGINNING)
    got = await read_until(call, lambda e: e.id == sentinel.id)
    call.cancel()
    assert keyed(got) == [
        ("task.put", "acme", "task", "t1"), ("task.put", "acme", "task", "t3"),
        ("task.put", "acme", "task", "t2"), ("task.checked", "acme", "task", "t3"),
    ]
    assert got[2].data["version"] == 2  # the put that moved t2 into core, not the first


async def _denied(call: grpc.aio.UnaryStreamCall) -> grpc.aio.AioRpcError:
    """Read the stream until it ends with an error (fails if it ends otherwise)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while True:
        try:
            msg = await asyncio.wait_for(call.read(), max(0.1, deadline - loop.time()))
        except grpc.aio.AioRpcError as exc:
            return exc
        except TimeoutError:
            raise AssertionError("the stream stayed open") from None
        assert msg is not grpc.aio.EOF, "the stream ended without an error"


async def _linked_and_open(b: NodeProcess, peering: Peering
                           ) -> tuple[AsyncClient, grpc.aio.UnaryStreamCall, admin_pb2.Grant]:
    token = await peering.invite(b, "a")
    grant = await peering.grant(b, "a", kinds=["task"], workspaces=["acme"],
                                event_types=["task.*"])
    joined = await peering.join_dir(token, peering.tmp_path / "peer-a")
    peer = joined.client()
    peering.clients.append(peer)
    call = subscribe(peer, "task.*", start=events_pb2.START_POSITION_NOW)
    assert await opened(call)
    return peer, call, grant


async def test_revoking_the_grant_ends_the_open_stream(b: NodeProcess, peering: Peering) -> None:
    _, call, grant = await _linked_and_open(b, peering)
    async with b.client("admin") as admin:
        await admin.admin.RevokeGrant(admin_pb2.RevokeGrantRequest(name=grant.name))
    err = await _denied(call)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason_of(err) == "GRANT_REVOKED"


async def test_suspending_the_peer_ends_the_open_stream(b: NodeProcess, peering: Peering) -> None:
    _, call, _ = await _linked_and_open(b, peering)
    async with b.client("admin") as admin:
        await admin.admin.SuspendPeer(admin_pb2.SuspendPeerRequest(name="a", reason="test"))
    err = await _denied(call)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason_of(err) == "PEER_SUSPENDED"


async def test_a_grant_expiring_ends_the_open_stream(b: NodeProcess, peering: Peering) -> None:
    expire = timestamp_pb2.Timestamp()
    expire.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3))
    peer = await peering.link(b, "a", kinds=["task"], workspaces=["acme"],
                              event_types=["task.*"], expire_time=expire)
    call = subscribe(peer, "task.*", start=events_pb2.START_POSITION_NOW)
    assert await opened(call)
    err = await _denied(call)  # no event and no notification: the grant's own deadline
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason_of(err) == "GRANT_EXPIRED"


async def test_revoking_the_peer_ends_the_stream_on_every_replica(
    node_factory: NodeFactory, b: NodeProcess, peering: Peering,
) -> None:
    # A second replica of b: same database, so the same peers and grants.
    b2 = node_factory(name="b", env={"TESSERA_STORE_DSN": b.env["TESSERA_STORE_DSN"]})
    _, call, _ = await _linked_and_open(b, peering)
    async with b2.client("admin") as admin:
        await admin.admin.RevokePeer(admin_pb2.RevokePeerRequest(name="a", reason="test"))
    err = await _denied(call)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason_of(err) in {"PEER_REVOKED", "CERT_REVOKED"}


async def test_peers_may_not_publish_and_need_event_types_to_follow(
    b: NodeProcess, peering: Peering,
) -> None:
    peer = await peering.link(b, "a", kinds=["task"], workspaces=["acme"])
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await peer.events.Publish(event("task.done"))
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    call = subscribe(peer)
    err = await _denied(call)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason_of(err) == "EVENT_TYPES_NOT_GRANTED"


async def test_a_peer_keeps_a_durable_subscription_of_its_own(
    b: NodeProcess, peering: Peering,
) -> None:
    peer = await peering.link(b, "a", kinds=["task"], workspaces=["acme"],
                              event_types=["task.*"])
    call = subscribe(peer, start=events_pb2.START_POSITION_BEGINNING, durable="mirror")
    first = await read_until(call, lambda e: e.subject.id == "t3")
    await peer.events.Ack(events_pb2.AckRequest(subscription="mirror", cursor=first[-1].cursor))
    call.cancel()
    async with b.client() as local:
        # The node's own client has no subscription of that name: names are per caller.
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await local.events.Ack(events_pb2.AckRequest(subscription="mirror",
                                                         cursor=first[-1].cursor))
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        nxt = (await local.events.Publish(
            event("task.done", subject=("acme", "task", "t1")))).event
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while True:  # the closed stream's lock is released in the background
        again = subscribe(peer, durable="mirror")
        if await opened(again):
            break
        assert loop.time() < deadline
        await asyncio.sleep(0.1)
    rest = await read_until(again, lambda e: e.id == nxt.id)
    again.cancel()
    assert [e.subject.id for e in rest] == ["p1", "t1"]  # after t3, nothing acked again


@pytest.mark.parametrize("how", ["revoke_grant", "suspend_peer"])
async def test_a_parked_peer_stream_ends_when_its_grant_is_revoked(
    node_factory: NodeFactory, peering: Peering, how: str,
) -> None:
    # A peer that stops reading mid-page parks its stream at a yield, in gRPC flow control.
    # The revocation must still end it: otherwise, once the peer reads again, the rest of
    # the page read under the old grant is delivered after the revocation committed.
    mport = free_port()
    node = node_factory(name="b", env={"TESSERA_METRICS_LISTEN_ADDRESS": f"127.0.0.1:{mport}"})

    def streams() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith('tessera_event_streams{caller="peer"} '):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    async with node.client() as local:
        await local.command.Execute(put("acme", "task", "t1"))
    token = await peering.invite(node, "a")
    grant = await peering.grant(node, "a", kinds=["task"], workspaces=["acme"],
                                event_types=["task.*"])
    joined = await peering.join_dir(token, peering.tmp_path / "peer-a")
    peer = joined.client()
    peering.clients.append(peer)
    call = subscribe(peer, "task.*", start=events_pb2.START_POSITION_NOW)
    assert await opened(call)
    async with node.client() as local:
        await publish_many(local, [event("task.step", subject=("acme", "task", "t1"), n=i,
                                         pad="x" * 4000) for i in range(3000)],
                           batch=500)
    assert await asyncio.to_thread(streams) == 1.0
    async with node.client("admin") as admin:
        if how == "revoke_grant":
            await admin.admin.RevokeGrant(admin_pb2.RevokeGrantRequest(name=grant.name))
        else:
            await admin.admin.SuspendPeer(admin_pb2.SuspendPeerRequest(name="a", reason="t"))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while await asyncio.to_thread(streams) != 0.0:
        assert loop.time() < deadline, "the parked peer stream outlived its revocation"
        await asyncio.sleep(0.2)
    call.cancel()


async def test_a_parked_peer_stream_ends_when_its_grant_expires(
    node_factory: NodeFactory, peering: Peering,
) -> None:
    # No notification and no step of the stream: only the clock can end it.
    mport = free_port()
    node = node_factory(name="b", env={"TESSERA_METRICS_LISTEN_ADDRESS": f"127.0.0.1:{mport}"})

    def streams() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith('tessera_event_streams{caller="peer"} '):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    async with node.client() as local:
        await local.command.Execute(put("acme", "task", "t1"))
    expire_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=20)
    expire = timestamp_pb2.Timestamp()
    expire.FromDatetime(expire_at)
    peer = await peering.link(node, "a", kinds=["task"], workspaces=["acme"],
                              event_types=["task.*"], expire_time=expire)
    call = subscribe(peer, "task.*", start=events_pb2.START_POSITION_NOW)
    assert await opened(call)
    async with node.client() as local:
        await publish_many(local, [event("task.step", subject=("acme", "task", "t1"), n=i,
                                         pad="x" * 4000) for i in range(3000)],
                           batch=500)
    assert dt.datetime.now(dt.UTC) < expire_at, "the stream was not parked before the expiry"
    assert await asyncio.to_thread(streams) == 1.0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20 + WAIT_S
    while await asyncio.to_thread(streams) != 0.0:
        assert loop.time() < deadline, "the parked peer stream outlived its grant"
        await asyncio.sleep(0.2)
    call.cancel()


async def test_a_busy_peer_stream_rechecks_its_grant_without_a_notification(
    node_factory: NodeFactory, peering: Peering,
) -> None:
    # A revocation whose NOTIFY this process never heard (committed while the stream was
    # being set up, or while LISTEN was silently down): the periodic re-check must catch
    # it even when events keep flowing, not only on an idle stream.
    import uuid

    import psycopg

    node = node_factory(name="b", env={"TESSERA_EVENTS_KEEPALIVE_S": "1"})
    async with node.client() as local:
        await local.command.Execute(put("acme", "task", "t1"))
    token = await peering.invite(node, "a")
    grant = await peering.grant(node, "a", kinds=["task"], workspaces=["acme"],
                                event_types=["task.*"])
    joined = await peering.join_dir(token, peering.tmp_path / "peer-a")
    peer = joined.client()
    peering.clients.append(peer)
    call = subscribe(peer, "task.*", start=events_pb2.START_POSITION_NOW)
    assert await opened(call)
    async with await psycopg.AsyncConnection.connect(node.env["TESSERA_STORE_DSN"],
                                                     autocommit=True) as conn:
        # As RevokeGrant does, minus its pg_notify: the signal is lost.
        await conn.execute("UPDATE grants SET revoked_at = now() WHERE id = %s",
                           (uuid.UUID(grant.name.removeprefix("grants/")),))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    async with node.client() as local:
        n = 0
        while True:
            assert loop.time() < deadline, "the stream kept delivering under a revoked grant"
            n += 1
            await local.events.Publish(event("task.step", subject=("acme", "task", "t1"), n=n))
            try:
                msg = await asyncio.wait_for(call.read(), 5)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
                assert reason_of(exc) == "GRANT_REVOKED"
                break
            assert msg is not grpc.aio.EOF
            await asyncio.sleep(0.2)
