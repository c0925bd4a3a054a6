"""Attacks on following peers, by a compromised followed peer, between real nodes.

B is "compromised" by writing rows straight into its own database: its API's checks are
bypassed, and its real Subscribe serves whatever is there to its follower A over mTLS.
Absence is proven by order: a sentinel published after the hostile rows arrives last.
"""

from __future__ import annotations

import hashlib

import grpc
import psycopg
import pytest

from tessera_client.pb import admin_pb2, events_pb2
from tests.fixtures.calls import put
from tests.fixtures.events import event, read_until, subscribe
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
from tests.fixtures.waiting import wait_until


def _inject(b: NodeProcess, *, data_json: str, tag: str) -> None:
    """Append an event to B's log directly (as a compromised B would serve it): a task.done
    on B's granted task, copying the team/owner of an event B published properly."""
    with psycopg.connect(b.env["TESSERA_STORE_DSN"], autocommit=True) as conn, \
            conn.transaction():
        conn.execute(
            "WITH c AS (UPDATE event_log SET last_sequence = last_sequence + 1 WHERE id = 1"
            "   RETURNING last_sequence AS s),"
            " t AS (SELECT workspace, kind, resource_id, team, owner, actor, origin"
            "   FROM events WHERE type = 'task.done' ORDER BY sequence DESC LIMIT 1)"
            " INSERT INTO events (sequence, type, workspace, kind, resource_id, team, owner,"
            "   data, actor, origin)"
            " SELECT c.s, 'task.done', t.workspace, t.kind, t.resource_id, t.team, t.owner,"
            "   jsonb_set(%s::jsonb, '{tag}', to_jsonb(%s::text)), t.actor, t.origin"
            " FROM c, t", (data_json, tag))
        conn.execute("SELECT pg_notify('tessera_events', 'x')")


async def test_a_compromised_peer_cannot_store_events_beyond_the_followers_payload_limit(
    node_factory: NodeFactory, peering: Peering,
) -> None:
    """Attack: B serves events far bigger than A's own events.max_payload_bytes (64 KiB by
    default); A stored them all, so a followed peer could fill A's disk (and its read-ahead
    of 2000 envelopes its memory) with payloads A's own API refuses."""
    b = node_factory(name="b", env=FAST)
    a = node_factory(name="a", env=FAST)
    await linked(b, a, peering)
    await follow(a, "b", "task.*")
    await wait_follow(a, "b", "connected")
    before = await publish(b, 1, "before")
    await log_of(a, "b", before[-1].id)

    big = '{"blob": "' + "x" * (512 * 1024) + '"}'
    _inject(b, data_json=big, tag="huge")
    _inject(b, data_json='{"small": 1}', tag="fits")
    after = await publish(b, 1, "after")
    got = await log_of(a, "b", after[-1].id)
    tags = [e.data["tag"] for e in got]
    assert "huge" not in tags
    # What fits is still stored, in order, and the follow goes on.
    assert tags == ["before", "fits", "after"]
    state = (await follows(a))["b"]
    assert state.state == "connected" and state.received == 3


async def test_a_peer_named_like_this_node_cannot_be_followed_as_if_its_events_were_ours(
    node_factory: NodeFactory, peering: Peering,
) -> None:
    """Attack: a peer calls itself by the follower's own node name. Joined without --as,
    A records it under that name, and once followed its events reached A's local tools
    with `source` = A's own name (and an origins filter naming A matched them): B's events
    passed for A's own. Following under this node's own name is refused."""
    b = node_factory(name="a", env=FAST)  # B claims A's name
    a = node_factory(name="a", env=FAST)
    token = await peering.invite(b, "joiner")
    await peering.grant(b, "joiner", kinds=["task"], workspaces=["*"], event_types=["*"])
    joined = await peering.join_dir(token, a.data_dir)
    assert joined.name == "a"  # recorded under the name B gave
    async with a.client("admin") as admin:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin.admin.FollowPeer(admin_pb2.FollowPeerRequest(name="a"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "name" in (refused.value.details() or "")
    assert "a" not in await follows(a)


async def test_follow_rpcs_are_admin_only_and_refuse_bad_input_precisely(
    node_factory: NodeFactory, peering: Peering,
) -> None:
    """Peers and local non-admin identities cannot follow, unfollow or forget; malformed
    names and patterns are INVALID_ARGUMENT, unknown peers a precise refusal, never
    UNKNOWN/INTERNAL."""
    b = node_factory(name="b", env=FAST)
    a = node_factory(name="a", env=FAST)
    await linked(b, a, peering)
    c = await peering.link(a, "c", kinds=["task"], workspaces=["*"], event_types=["*"])
    calls = (
        ("FollowPeer", admin_pb2.FollowPeerRequest(name="b")),
        ("UnfollowPeer", admin_pb2.UnfollowPeerRequest(name="b")),
        ("ForgetPeer", admin_pb2.ForgetPeerRequest(name="b")),
    )
    async with a.client() as local:
        for who in (c, local):
            for method, req in calls:
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await getattr(who.admin, method)(req)
                assert denied.value.code() in (grpc.StatusCode.PERMISSION_DENIED,
                                               grpc.StatusCode.UNAUTHENTICATED), method
    assert await follows(a) == {}

    bad_names = ["", "b\x00", "bé", "B", "../b", "b" * 65, "-b", "*", "local"]
    async with a.client("admin") as admin:
        for name in bad_names:
            for method, cls in (("FollowPeer", admin_pb2.FollowPeerRequest),
                                ("UnfollowPeer", admin_pb2.UnfollowPeerRequest),
                                ("ForgetPeer", admin_pb2.ForgetPeerRequest)):
                if name == "local" and method != "FollowPeer":
                    continue
                with pytest.raises(grpc.aio.AioRpcError) as bad:
                    await getattr(admin.admin, method)(cls(name=name))
                assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, name)
        for patterns in (["task.\x00"], ["é.*"], [""], ["x" * 200], ["*"] * 33, ["task .x"]):
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await admin.admin.FollowPeer(admin_pb2.FollowPeerRequest(
                    name="b", type_patterns=patterns))
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, patterns
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await admin.admin.FollowPeer(admin_pb2.FollowPeerRequest(name="nobody"))
        assert unknown.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await admin.admin.UnfollowPeer(admin_pb2.UnfollowPeerRequest(name="nobody"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        gone = await admin.admin.ForgetPeer(admin_pb2.ForgetPeerRequest(name="nobody"))
        assert gone.deleted == 0
    # The origins filter a local tool uses to see followed peers' events.
    async with a.client() as local:
        for origins in (["b\x00"], ["bé"], ["B"], [""], ["../b"], ["b"] * 33, ["-"]):
            call = local.events.Subscribe(events_pb2.SubscribeRequest(origins=origins))
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await call.read()
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, origins
            assert "origins" in (bad.value.details() or ""), origins
    assert await follows(a) == {}


def _follow_lock_holders(node: NodeProcess, peer: str) -> list[int]:
    """Backend pids holding `peer`'s follow lock in the node's database (the key is the
    documented one: the first 8 bytes of sha256("tessera-follow\\0" + peer), signed)."""
    key = int.from_bytes(hashlib.sha256(f"tessera-follow\0{peer}".encode()).digest()[:8],
                         "big", signed=True)
    with psycopg.connect(node.env["TESSERA_STORE_DSN"], autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND classid = ((%s::bigint >> 32) & 4294967295)::bigint::oid"
            " AND objid = (%s::bigint & 4294967295)::bigint::oid AND objsubid = 1",
            (key, key)).fetchall()
    return [int(r[0]) for r in rows]


async def test_with_two_workers_exactly_one_follows_and_nothing_is_stored_twice(
    node_factory: NodeFactory, peering: Peering,
) -> None:
    """--workers 2: both serving processes run the follower; the advisory lock lets one
    hold the stream, so B's events are stored once, in order."""
    b = node_factory(name="b", env=FAST)
    a = node_factory(name="a", env={**FAST, "TESSERA_NODE_WORKERS": "2"})
    await linked(b, a, peering)
    await follow(a, "b", "task.*")
    await wait_follow(a, "b", "connected")
    await wait_until(lambda: len(_follow_lock_holders(a, "b")) == 1 or None,
                     "one process to hold b's follow lock")
    sent = await publish(b, 30, "workers")
    got = await log_of(a, "b", sent[-1].id)
    assert [e.id for e in got] == [e.id for e in sent]
    state = (await follows(a))["b"]
    assert state.received == 30 and state.duplicates == 0
    assert len(_follow_lock_holders(a, "b")) == 1


async def test_another_peer_reaches_no_followed_event_by_cursor_seek_ack_or_early_durable(
    node_factory: NodeFactory, peering: Peering,
) -> None:
    """C, granted everything by A, tries the paths the plain-stream test does not: a durable
    subscription made before A followed B (positioned before B's events arrived), a seek to
    the exact cursor A's local tool shows for a received event (and one before it), and an
    ack to such a cursor; every pattern and origin filter. None yields an event of B."""
    b = node_factory(name="b", env=FAST)
    a = node_factory(name="a", env=FAST)
    await linked(b, a, peering)
    c = await peering.link(a, "c", kinds=["task", "note"], workspaces=["*"],
                           event_types=["*"], include_personal=True)
    async with a.client() as local:
        await local.command.Execute(put(*SUBJECT, team="core"))
        before = (await local.events.Publish(event("task.done", subject=SUBJECT))).event
    early = subscribe(c, start=events_pb2.START_POSITION_BEGINNING, durable="early")
    await read_until(early, lambda e: e.id == before.id)
    early.cancel()

    await follow(a, "b")
    await wait_follow(a, "b", "connected")
    from_b = await publish(b, 3, "secret")
    received = await log_of(a, "b", from_b[-1].id)  # A's own cursors for B's events
    b_ids = {e.id for e in from_b}
    async with a.client() as local:
        sentinel = (await local.events.Publish(event("task.done", subject=SUBJECT))).event

    resumed = subscribe(c, durable="early")
    got = await read_until(resumed, lambda e: e.id == sentinel.id)
    assert not b_ids & {e.id for e in got}
    # An ack to a received event's cursor is only a position (never backwards).
    await c.events.Ack(events_pb2.AckRequest(subscription="early",
                                             cursor=received[0].cursor))
    resumed.cancel()
    for cursor in (received[0].cursor, before.cursor):
        only_b = c.events.Subscribe(events_pb2.SubscribeRequest(
            start=events_pb2.START_POSITION_CURSOR, cursor=cursor, origins=["b"]))
        assert await head_heartbeat(only_b, sentinel.cursor) == []
        only_b.cancel()
        for patterns, origins in (([], []), (["*"], ["*"]), (["task.*"], ["b", "local"]),
                                  (["task.done"], ["*", "b"])):
            call = c.events.Subscribe(events_pb2.SubscribeRequest(
                start=events_pb2.START_POSITION_CURSOR, cursor=cursor,
                type_patterns=patterns, origins=origins))
            got = await read_until(call, lambda e: e.id == sentinel.id)
            call.cancel()
            assert not b_ids & {e.id for e in got}, (patterns, origins)
            assert {e.source for e in got} == {"a"}
