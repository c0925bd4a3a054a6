"""Attacks on following peers, by a compromised followed peer, between real nodes.

B is "compromised" by writing rows straight into its own database: its API's checks are
bypassed, and its real Subscribe serves whatever is there to its follower A over mTLS.
Absence is proven by order: a sentinel published after the hostile rows arrives last.
"""

from __future__ import annotations

import grpc
import psycopg
import pytest

from tessera_client.pb import admin_pb2
from tests.e2e.test_follow import (
    FAST,
    _follow,
    _follows,
    _linked,
    _log_of,
    _publish,
    _wait_follow,
)
from tests.fixtures.nodes import NodeFactory, NodeProcess
from tests.fixtures.peers import Peering


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
    await _linked(b, a, peering)
    await _follow(a, "b", "task.*")
    await _wait_follow(a, "b", "connected")
    before = await _publish(b, 1, "before")
    await _log_of(a, "b", before[-1].id)

    big = '{"blob": "' + "x" * (512 * 1024) + '"}'
    _inject(b, data_json=big, tag="huge")
    _inject(b, data_json='{"small": 1}', tag="fits")
    after = await _publish(b, 1, "after")
    got = await _log_of(a, "b", after[-1].id)
    tags = [e.data["tag"] for e in got]
    assert "huge" not in tags
    # What fits is still stored, in order, and the follow goes on.
    assert tags == ["before", "fits", "after"]
    state = (await _follows(a))["b"]
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
    assert "a" not in await _follows(a)


async def test_follow_rpcs_are_admin_only_and_refuse_bad_input_precisely(
    node_factory: NodeFactory, peering: Peering,
) -> None:
    """Peers and local non-admin identities cannot follow, unfollow or forget; malformed
    names and patterns are INVALID_ARGUMENT, unknown peers a precise refusal, never
    UNKNOWN/INTERNAL."""
    b = node_factory(name="b", env=FAST)
    a = node_factory(name="a", env=FAST)
    await _linked(b, a, peering)
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
    assert await _follows(a) == {}

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
    assert await _follows(a) == {}
