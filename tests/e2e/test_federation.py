"""Federated fan-out across three real nodes: merge, tags, offline cache, breaker, revocation."""

from __future__ import annotations

import grpc
import pytest

from tessera_client.pb import admin_pb2, query_pb2, resources_pb2
from tests.fixtures.calls import put
from tests.fixtures.nodes import NodeFactory, NodeProcess
from tests.fixtures.peers import Peering
from tests.fixtures.waiting import wait_until

ALL = resources_pb2.Sources(scope=resources_pb2.Sources.SCOPE_ALL)
FAST = {"TESSERA_FEDERATION_PEER_TIMEOUT_MS": "1500",
        "TESSERA_FEDERATION_BREAKER_FAILURES": "2",
        "TESSERA_FEDERATION_BREAKER_COOLDOWN_S": "1"}
State = resources_pb2.SourceStatus


async def _put(node: NodeProcess, *reqs: object) -> None:
    async with node.client() as c:
        for r in reqs:
            await c.command.Execute(r)


async def _hub_with_two_peers(node_factory: NodeFactory, peering: Peering,
                              ) -> tuple[NodeProcess, NodeProcess, NodeProcess]:
    """Node a has joined b and c; b and c granted a their 'shared' tasks and notes."""
    a = node_factory(name="a", env=FAST)
    b = node_factory(name="b")
    c = node_factory(name="c")
    for peer in (b, c):
        token = await peering.invite(peer, "a")
        await peering.grant(peer, "a", kinds=["task", "note"], workspaces=["shared"])
        res = peering.join_cli(token, a)
        assert res.returncode == 0, res.stderr
    await _put(a, put("shared", "task", "t1", title="a's task"))
    await _put(b, put("shared", "task", "t2", title="b's task"),
               put("shared", "task", "t1", title="b's own t1"),
               put("private", "task", "secret", title="not granted"))
    await _put(c, put("shared", "task", "t3", title="c's task"),
               put("shared", "memory", "m1", title="kind not granted"))
    return a, b, c


async def test_sources_all_merges_and_tags_rows_from_every_node(
    node_factory: NodeFactory, peering: Peering
) -> None:
    a, _, _ = await _hub_with_two_peers(node_factory, peering)
    async with a.client() as client:
        resp = await client.query.ListResources(query_pb2.ListResourcesRequest(
            workspace="shared", sources=ALL))
        rows = [(r.source, r.id, r.title) for r in resp.resources]
        assert rows == [("local", "t1", "a's task"), ("b", "t1", "b's own t1"),
                        ("b", "t2", "b's task"), ("c", "t3", "c's task")]
        assert {(s.source, s.state, s.row_count) for s in resp.source_status} == {
            ("local", State.STATE_OK, 1), ("b", State.STATE_OK, 2), ("c", State.STATE_OK, 1)}

        # Paging through the union with page_size 1 gives the same rows, none twice.
        seen, token = [], ""
        while True:
            page = await client.query.ListResources(query_pb2.ListResourcesRequest(
                workspace="shared", sources=ALL, page_size=1, page_token=token))
            seen += [(r.source, r.id) for r in page.resources]
            token = page.next_page_token
            if not token:
                break
        assert sorted(seen) == sorted((s, i) for s, i, _ in rows)

        got = await client.query.GetResource(query_pb2.GetResourceRequest(
            key=resources_pb2.ResourceKey(workspace="shared", kind="task", id="t3"),
            sources=ALL))
        assert (got.resource.source, got.resource.title) == ("c", "c's task")


async def test_a_peer_cannot_fan_out_and_only_local_identities_may(
    node_factory: NodeFactory, peering: Peering
) -> None:
    b = node_factory(name="b")
    client = await peering.link(b, "x", kinds=["task"], workspaces=["*"])
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await client.query.ListResources(query_pb2.ListResourcesRequest(sources=ALL))
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_an_offline_peer_is_reported_its_cached_rows_served_and_the_breaker_closes(
    node_factory: NodeFactory, peering: Peering
) -> None:
    a, _, c = await _hub_with_two_peers(node_factory, peering)
    req = query_pb2.ListResourcesRequest(workspace="shared", kind="task", sources=ALL)
    async with a.client() as client:
        await client.query.ListResources(req)  # fills the offline cache
        c.listen = c.address
        c.stop()
        # Answered (from cache) by the node's federation deadline, not hung on c: a hang
        # ends in DEADLINE_EXCEEDED here and fails the test.
        resp = await client.query.ListResources(req, timeout=30)
        status = {s.source: s for s in resp.source_status}
        assert status["c"].state == State.STATE_CACHED and "offline" in status["c"].message
        assert status["b"].state == State.STATE_OK
        cached = [r for r in resp.resources if r.source == "c"]
        assert [(r.id, r.cached) for r in cached] == [("t3", True)]
        assert all(not r.cached for r in resp.resources if r.source != "c")
        # A query never cached before: c is plainly offline.
        other = await client.query.ListResources(query_pb2.ListResourcesRequest(
            workspace="shared", kind="note", sources=ALL))
        assert {s.source: s.state for s in other.source_status}["c"] == State.STATE_OFFLINE

        c.start()

        async def c_answers() -> query_pb2.ListResourcesResponse | None:
            # Polled: after the breaker's cool-down the next query reaches c again.
            resp = await client.query.ListResources(req)
            ok = {s.source: s.state for s in resp.source_status}["c"] == State.STATE_OK
            return resp if ok else None

        resp = await wait_until(c_answers, "queries reach c again after it restarted")
        assert [(r.id, r.cached) for r in resp.resources if r.source == "c"] == [("t3", False)]


async def test_a_revoked_grant_is_never_answered_from_cache(
    node_factory: NodeFactory, peering: Peering
) -> None:
    a, b, _ = await _hub_with_two_peers(node_factory, peering)
    req = query_pb2.ListResourcesRequest(workspace="shared", kind="task", sources=ALL)
    async with a.client() as client:
        first = await client.query.ListResources(req)
        assert any(r.source == "b" for r in first.resources)
        async with b.client("admin") as admin:
            grants = await admin.admin.ListGrants(admin_pb2.ListGrantsRequest(peer="a"))
            await admin.admin.RevokeGrant(admin_pb2.RevokeGrantRequest(
                name=grants.grants[0].name))
        resp = await client.query.ListResources(req)
        assert not [r for r in resp.resources if r.source == "b"]
        assert {s.source: s.state for s in resp.source_status}["b"] == State.STATE_DENIED
        # And once b is offline too, nothing of b's comes back from the cache.
        b.stop()
        resp = await client.query.ListResources(req)
        assert not [r for r in resp.resources if r.source == "b"]
        assert {s.source: s.state for s in resp.source_status}["b"] == State.STATE_OFFLINE


async def test_federated_search_merges_by_score_and_is_never_cached(
    node_factory: NodeFactory, peering: Peering
) -> None:
    a, b, c = await _hub_with_two_peers(node_factory, peering)
    for node, vec, rid in ((a, [1.0, 0, 0, 0], "va"), (b, [0.9, 0.1, 0, 0], "vb"),
                           (c, [0, 1.0, 0, 0], "vc")):
        req = put("shared", "note", rid)
        req.put_resource.resource.embedding.extend(vec)
        await _put(node, req)
    search = query_pb2.SearchResourcesRequest(embedding=[1.0, 0, 0, 0], k=2, sources=ALL)
    async with a.client() as client:
        resp = await client.query.SearchResources(search)
        assert [(h.resource.source, h.resource.id) for h in resp.hits] == [
            ("local", "va"), ("b", "vb")]
        c.stop()
        resp = await client.query.SearchResources(search)
        assert {s.source: s.state for s in resp.source_status}["c"] == State.STATE_OFFLINE
