"""Peering, grants and scope enforcement between real node processes over real mTLS.

Node B serves; peers join it with single-use tokens and read exactly what their grant
allows. Every call goes through PostgreSQL-backed admission and SQL-pushed scopes.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from tessera.peering import join
from tessera.peering._token import parse as parse_token
from tessera.pki import SpiffeId, new_key_and_csr
from tessera_client import Client
from tessera_client.pb import admin_pb2, admin_pb2_grpc, command_pb2, query_pb2, resources_pb2
from tests.fixtures.calls import bad_fields, key, put, reason_of, run_cli
from tests.fixtures.nodes import NodeFactory, NodeProcess
from tests.fixtures.peers import Peering, keys, list_all
from tests.fixtures.waiting import wait_until

#: B's data: (workspace, kind, id, team, owner).
SEED = [
    ("acme", "task", "t1", "core", "bob"),
    ("acme", "task", "t2", "ops", ""),
    ("acme", "task", "t3", "core", ""),
    ("acme", "task", "p1", "core", "ann"),  # ann's personal task
    ("acme", "note", "n1", "core", ""),
    ("acme", "memory", "m1", "core", ""),  # excluded by the grant
    ("acme", "credential", "c1", "core", ""),  # never shareable
    ("beta", "task", "x1", "core", ""),  # another workspace
    ("beta", "note", "x2", "core", ""),
]


async def seed(node: NodeProcess, rows: list[tuple[str, str, str, str, str]] = SEED) -> None:
    async with node.client() as c:
        for ws, kind, rid, team, owner in rows:
            await c.command.Execute(put(ws, kind, rid, team=team, owner=owner))


@pytest.fixture
async def b(node_factory: NodeFactory) -> NodeProcess:
    node = node_factory(name="b")
    await seed(node)
    return node


async def expect_error(call: object, code: grpc.StatusCode, reason: str | None = None
                       ) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == code, info.value.details()
    if reason is not None:
        assert reason_of(info.value) == reason, info.value.details()
    return info.value


async def test_node_joins_with_cli_token_and_reads_only_its_scope(
    node_factory: NodeFactory, b: NodeProcess, peering: Peering
) -> None:
    a = node_factory(name="a")
    token = await peering.invite(b, "a")
    await peering.grant(b, "a", kinds=["task", "note", "memory"], excluded_kinds=["memory"],
                        workspaces=["acme"], subject_user="ann", row_cap=2)
    done = peering.join_cli(token, a)
    assert done.returncode == 0, done.stderr
    outbound = peering.outbound(a, "b")
    assert outbound.as_identity == "spiffe://tessera.local/node/a"
    assert oct(outbound.key.stat().st_mode & 0o777) == "0o600"
    async with outbound.client() as peer:
        got = await peer.query.GetResource(query_pb2.GetResourceRequest(
            key=key("acme", "task", "t1")))
        assert got.resource.id == "t1"
        # Every page is capped by the grant's row cap, and no page holds a row outside it.
        rows, sizes = await list_all(peer, page_size=100)
        assert keys(rows) == {("acme", "task", "t1"), ("acme", "task", "t2"),
                              ("acme", "task", "t3"), ("acme", "note", "n1")}
        assert max(sizes) <= 2
        rows, _ = await list_all(peer, page_size=1, order=query_pb2.LIST_ORDER_UPDATE_TIME_DESC)
        assert len(rows) == 4
        rows, _ = await list_all(peer, kind="task")
        assert keys(rows) == {("acme", "task", "t1"), ("acme", "task", "t2"),
                              ("acme", "task", "t3")}
        # Explicitly named kinds and workspaces outside the grant are refused outright.
        for k in (key("acme", "credential", "c1"), key("acme", "memory", "m1")):
            await expect_error(peer.query.GetResource(query_pb2.GetResourceRequest(key=k)),
                               grpc.StatusCode.PERMISSION_DENIED, "KIND_NOT_GRANTED")
        await expect_error(peer.query.GetResource(query_pb2.GetResourceRequest(
            key=key("beta", "task", "x1"))), grpc.StatusCode.PERMISSION_DENIED,
            "WORKSPACE_NOT_GRANTED")
        for kind in ("credential", "memory"):
            await expect_error(peer.query.ListResources(query_pb2.ListResourcesRequest(
                kind=kind)), grpc.StatusCode.PERMISSION_DENIED, "KIND_NOT_GRANTED")
        await expect_error(peer.query.ListResources(query_pb2.ListResourcesRequest(
            workspace="beta")), grpc.StatusCode.PERMISSION_DENIED, "WORKSPACE_NOT_GRANTED")
        # A personal row answers exactly like a missing one.
        hidden = await expect_error(peer.query.GetResource(query_pb2.GetResourceRequest(
            key=key("acme", "task", "p1"))), grpc.StatusCode.NOT_FOUND)
        missing = await expect_error(peer.query.GetResource(query_pb2.GetResourceRequest(
            key=key("acme", "task", "nope"))), grpc.StatusCode.NOT_FOUND)
        assert hidden.details().replace("p1", "X") == missing.details().replace("nope", "X")
        # Filters narrow the scope, never widen it.
        rows, _ = await list_all(peer, owner="ann")
        assert rows == []
        described = await peer.query.Describe(query_pb2.DescribeRequest())
        assert list(described.kinds) == ["note", "task"]
        assert list(described.workspaces) == ["acme"]
        assert not described.all_kinds and not described.all_workspaces
        await expect_error(peer.query.ListResources(query_pb2.ListResourcesRequest(
            sources=resources_pb2.Sources(scope=resources_pb2.Sources.SCOPE_ALL))),
            grpc.StatusCode.PERMISSION_DENIED, "FANOUT_NOT_ALLOWED")
        await expect_error(peer.admin.ListPeers(admin_pb2.ListPeersRequest()),
                           grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED")
        await expect_error(peer.command.ListOperations(command_pb2.ListOperationsRequest()),
                           grpc.StatusCode.PERMISSION_DENIED, "METHOD_NOT_GRANTED")
        await expect_error(peer.command.Execute(put("acme", "task", "t9")),
                           grpc.StatusCode.PERMISSION_DENIED, "COMMAND_NOT_GRANTED")


async def test_revoking_the_grant_denies_the_next_call_on_the_same_channel(
    b: NodeProcess, peering: Peering
) -> None:
    peer = await peering.link(b, "reader", kinds=["task"], workspaces=["acme"], row_cap=1)
    first = await peer.query.ListResources(query_pb2.ListResourcesRequest(page_size=1))
    assert first.next_page_token
    async with b.client("admin") as admin:
        grants = await admin.admin.ListGrants(admin_pb2.ListGrantsRequest(peer="reader"))
        (grant,) = grants.grants
        revoked = await admin.admin.RevokeGrant(admin_pb2.RevokeGrantRequest(name=grant.name))
        assert revoked.revoked
        await expect_error(peer.query.ListResources(query_pb2.ListResourcesRequest(
            page_size=1, page_token=first.next_page_token)),
            grpc.StatusCode.PERMISSION_DENIED, "NO_GRANT")
        await expect_error(peer.query.GetResource(query_pb2.GetResourceRequest(
            key=key("acme", "task", "t1"))), grpc.StatusCode.PERMISSION_DENIED, "NO_GRANT")
        # A new grant does not revive page tokens minted under the old one.
        await admin.admin.CreateGrant(admin_pb2.CreateGrantRequest(grant=admin_pb2.Grant(
            peer="reader", kinds=["task", "note"], workspaces=["*"])))
    err = await expect_error(peer.query.ListResources(query_pb2.ListResourcesRequest(
        page_size=1, page_token=first.next_page_token)), grpc.StatusCode.INVALID_ARGUMENT)
    assert bad_fields(err) == ["page_token"]
    rows, _ = await list_all(peer)
    assert keys(rows) == {(ws, k, i) for ws, k, i, _, _ in SEED if k in ("task", "note")}


async def test_revoking_or_suspending_the_peer_fails_its_next_call(
    b: NodeProcess, peering: Peering
) -> None:
    grant: dict[str, Any] = {"kinds": ["task"], "workspaces": ["acme"]}
    revoked = await peering.link(b, "gone", **grant)
    suspended = await peering.link(b, "paused", **grant)
    request = query_pb2.GetResourceRequest(key=key("acme", "task", "t1"))
    assert (await revoked.query.GetResource(request)).resource.id == "t1"
    assert (await suspended.query.GetResource(request)).resource.id == "t1"
    async with b.client("admin") as admin:
        peer = await admin.admin.RevokePeer(admin_pb2.RevokePeerRequest(name="gone",
                                                                        reason="test"))
        assert peer.state == admin_pb2.PEER_STATE_REVOKED
        assert peer.certificate_serial
        await admin.admin.SuspendPeer(admin_pb2.SuspendPeerRequest(name="paused"))
        # Revoked peers get no new grant, and a revoked name is never reused.
        await expect_error(admin.admin.CreateGrant(admin_pb2.CreateGrantRequest(
            grant=admin_pb2.Grant(peer="gone", **grant))), grpc.StatusCode.FAILED_PRECONDITION)
        await expect_error(admin.admin.InvitePeer(admin_pb2.InvitePeerRequest(name="gone")),
                           grpc.StatusCode.FAILED_PRECONDITION, "PEER_EXISTS")
    # Refused by peer state (PERMISSION_DENIED) or, once the deny list has the serial,
    # by the certificate check (UNAUTHENTICATED): either way the very next call fails.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await revoked.query.GetResource(request)
    assert info.value.code() in (grpc.StatusCode.PERMISSION_DENIED,
                                 grpc.StatusCode.UNAUTHENTICATED)
    assert reason_of(info.value) in ("PEER_REVOKED", "CERT_REVOKED")
    await expect_error(suspended.query.GetResource(request), grpc.StatusCode.PERMISSION_DENIED,
                       "PEER_SUSPENDED")


async def test_enrolment_tokens_are_single_use_expiring_and_unforgeable(
    b: NodeProcess, peering: Peering
) -> None:
    token = await peering.invite(b, "once")
    await peering.join_dir(token)
    err = await expect_error(peering.join_dir(token), grpc.StatusCode.PERMISSION_DENIED,
                             "TOKEN_USED")
    assert "already used" in err.details()

    short = await peering.invite(b, "late", ttl_s=1)
    # The node set the expiry at most 1 s after this moment (one clock: same machine).
    expires_by = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    await wait_until(lambda: dt.datetime.now(dt.UTC) > expires_by, "the token's TTL is over")
    await expect_error(peering.join_dir(short), grpc.StatusCode.UNAUTHENTICATED,
                       "TOKEN_EXPIRED")

    fresh = await peering.invite(b, "forged")
    other = await peering.invite(b, "victim")
    # Re-aimed at another invited peer: the body no longer matches the node's MAC.
    prefix, body, mac = fresh.split(".")
    content = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    content["n"] = "victim"
    retargeted = base64.urlsafe_b64encode(json.dumps(content).encode()).rstrip(b"=").decode()
    for forged in (f"{prefix}.{retargeted}.{mac}", f"{prefix}.{body}.{'A' * len(mac)}"):
        await expect_error(peering.join_dir(forged), grpc.StatusCode.UNAUTHENTICATED,
                           "TOKEN_INVALID")
    # A CSR for any identity but the invited one (or with extra SANs) is refused, and
    # refusing it does not use up the token.
    inv = parse_token(fresh)
    async with grpc.aio.secure_channel(
        inv.enroll_address, grpc.ssl_channel_credentials(inv.root_pem())
    ) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        for identity, dns in ((inv.trust_domain + "/node/victim", ()),
                              (inv.trust_domain + "/node/forged", ("localhost",))):
            csr = new_key_and_csr(SpiffeId.parse(f"spiffe://{identity}"), dns).csr_pem
            err = await expect_error(stub.EnrollPeer(admin_pb2.EnrollPeerRequest(
                token=fresh, csr_pem=csr.decode())), grpc.StatusCode.INVALID_ARGUMENT)
            assert bad_fields(err) == ["csr_pem"]
        # Only EnrollPeer is served without a client certificate.
        await expect_error(stub.ListPeers(admin_pb2.ListPeersRequest()),
                           grpc.StatusCode.UNIMPLEMENTED)
    # The genuine tokens still work after the forgeries were refused.
    await peering.join_dir(fresh)
    await peering.join_dir(other)

    async with b.client("admin") as admin:
        err = await expect_error(admin.admin.InvitePeer(admin_pb2.InvitePeerRequest(
            name="toolong", token_ttl=duration_pb2.Duration(seconds=16 * 60))),
            grpc.StatusCode.INVALID_ARGUMENT)
        assert bad_fields(err) == ["token_ttl"]
        err = await expect_error(admin.admin.EnrollPeer(admin_pb2.EnrollPeerRequest(
            token="nonsense", csr_pem="x")), grpc.StatusCode.INVALID_ARGUMENT)
        assert bad_fields(err) == ["token"]


async def test_three_peers_calling_concurrently_each_see_exactly_their_scope(
    b: NodeProcess, peering: Peering
) -> None:
    grants = {
        "p-acme-tasks": {"kinds": ["task"], "workspaces": ["acme"], "teams": ["core"]},
        "p-notes": {"kinds": ["note"], "workspaces": ["*"]},
        "p-beta": {"kinds": ["task", "note", "credential"], "workspaces": ["beta"],
                   "excluded_kinds": ["note"]},
    }
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await peering.link(b, "p-beta", **grants["p-beta"])
    # A never-shareable kind is refused at creation, naming the field.
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "grant.kinds" in bad_fields(refused.value)
    grants["p-beta"]["kinds"] = ["task", "note"]
    clients = {}
    for name, grant in grants.items():
        clients[name] = await peering.link(b, name if name != "p-beta" else "p-beta2", **grant)
    expected = {
        "p-acme-tasks": {("acme", "task", "t1"), ("acme", "task", "t3"),
                         ("acme", "task", "p1")},
        "p-notes": {("acme", "note", "n1"), ("beta", "note", "x2")},
        "p-beta": {("beta", "task", "x1")},
    }

    async def reader(name: str) -> None:
        for page_size in (1, 2, 3, 100) * 5:
            rows, _ = await list_all(clients[name], page_size=page_size)
            assert keys(rows) == expected[name], name

    await asyncio.gather(*(reader(name) for name in clients))


async def test_peer_writes_only_inside_its_grant(b: NodeProcess, peering: Peering) -> None:
    peer = await peering.link(b, "writer", kinds=["task"], workspaces=["acme"],
                              teams=["core"], subject_user="ann",
                              command_types=["resource.put", "resource.delete"])
    op = await peer.command.Execute(put("acme", "task", "w1", team="core"))
    assert op.result.resource.id == "w1"
    for request, reason in (
        (put("acme", "task", "w2", team="ops"), "TEAM_NOT_GRANTED"),
        (put("acme", "task", "w3", team="core", owner="ann"), "PERSONAL_DATA"),
        (put("acme", "note", "w4", team="core"), "KIND_NOT_GRANTED"),
        (put("beta", "task", "w5", team="core"), "WORKSPACE_NOT_GRANTED"),
        # t2 exists in team ops: it cannot be taken over by writing it as team core.
        (put("acme", "task", "t2", team="core"), "RESOURCE_OUT_OF_SCOPE"),
    ):
        await expect_error(peer.command.Execute(request), grpc.StatusCode.PERMISSION_DENIED,
                           reason)
    # Deleting a row outside the scope answers as if it did not exist, and keeps it.
    delete = command_pb2.ExecuteRequest(
        idempotency_key="del-t2", delete_resource=command_pb2.DeleteResourceCommand(
            key=key("acme", "task", "t2")))
    await expect_error(peer.command.Execute(delete), grpc.StatusCode.NOT_FOUND)
    async with b.client() as local:
        kept = await local.query.GetResource(query_pb2.GetResourceRequest(
            key=key("acme", "task", "t2")))
        assert kept.resource.team == "ops"
    delete.idempotency_key, delete.delete_resource.key.id = "del-w1", "w1"
    deleted = await peer.command.Execute(delete)
    assert deleted.result.resource.id == "w1"


# -- property: list answers through a real node equal a plain reference evaluator ---------

WORKSPACES = ("w1", "w2", "w3")
KINDS = ("task", "note", "memory", "credential")
TEAMS = ("t1", "t2")
OWNERS = ("", "ann", "bob")
Row = tuple[str, str, str, str, str]  # workspace, kind, id, team, owner


def reference_visible(grant: admin_pb2.Grant, row: Row, never_shared: set[str]) -> bool:
    """What a grant allows, written out plainly and independently of tessera.grants."""
    workspace, kind, _, team, owner = row
    if not grant.workspaces and not grant.teams:
        return False
    if kind not in grant.kinds or kind in grant.excluded_kinds or kind in never_shared:
        return False
    if grant.workspaces and "*" not in grant.workspaces and workspace not in grant.workspaces:
        return False
    if grant.teams and team not in grant.teams:
        return False
    return not (grant.subject_user and not grant.include_personal
                and owner == grant.subject_user)


rows_strategy = st.lists(
    st.tuples(st.sampled_from(WORKSPACES), st.sampled_from(KINDS), st.sampled_from(("", *TEAMS)),
              st.sampled_from(OWNERS)), max_size=8)
grant_strategy = st.builds(
    lambda kinds, credential, excluded, workspaces, teams, subject, personal, cap:
    admin_pb2.Grant(
        kinds=sorted(kinds | ({"credential"} if credential == 0 else set())),
        excluded_kinds=sorted(excluded), workspaces=workspaces, teams=sorted(teams),
        subject_user=subject, include_personal=personal, row_cap=cap),
    st.sets(st.sampled_from(KINDS[:3]), min_size=1),
    # One grant in ten names a never-shareable kind: the node must refuse it.
    st.integers(0, 9),
    st.sets(st.sampled_from(KINDS)),
    st.one_of(st.just(["*"]), st.lists(st.sampled_from(WORKSPACES), unique=True, max_size=3)),
    st.sets(st.sampled_from(TEAMS)),
    st.sampled_from(("", "ann")), st.booleans(), st.integers(0, 3),
)
KEY_ASC, UPDATED_DESC = query_pb2.LIST_ORDER_KEY_ASC, query_pb2.LIST_ORDER_UPDATE_TIME_DESC


@dataclass
class Served:
    """One node shared by every generated example, and everything put into it so far."""

    node: NodeProcess
    examples: itertools.count[int] = field(default_factory=itertools.count)
    mirror: list[Row] = field(default_factory=list)


@pytest.fixture
def served(node_factory: NodeFactory) -> Served:
    # Paging one row at a time through every example's rows would hit the default peer
    # read limit; limits are tested elsewhere, here only the answers matter.
    return Served(node_factory(name="b", env={"TESSERA_RATELIMIT_PEER_LIMITS": "read=0"}))


def _own(n: int, workspace: str) -> str:
    """Example n's own name for a workspace, so examples never share rows by accident."""
    return workspace if workspace in ("", "*") else f"x{n}-{workspace}"


# Grants naming several workspaces, with rows in a workspace they do not name: the case a
# scope that drops the workspace filter gets wrong.
_SPREAD = [("w1", "task", "", ""), ("w2", "task", "", ""), ("w3", "task", "", ""),
           ("w3", "note", "t1", "")]


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@example(rows=_SPREAD, grant=admin_pb2.Grant(kinds=["task"], workspaces=["w1", "w2"]),
         page_size=2, order=KEY_ASC, kind_filter="", ws_filter="")
@example(rows=_SPREAD, grant=admin_pb2.Grant(kinds=["note", "task"], workspaces=["w1", "w3"]),
         page_size=1, order=UPDATED_DESC, kind_filter="task", ws_filter="")
@example(rows=_SPREAD, grant=admin_pb2.Grant(kinds=["task"], workspaces=["w1", "w2"]),
         page_size=3, order=KEY_ASC, kind_filter="", ws_filter="w3")
@example(rows=_SPREAD, grant=admin_pb2.Grant(kinds=["note"], workspaces=["w2", "w3"],
                                             teams=["t1"]),
         page_size=4, order=KEY_ASC, kind_filter="", ws_filter="")
@given(rows=rows_strategy, grant=grant_strategy, page_size=st.integers(1, 4),
       order=st.sampled_from((KEY_ASC, UPDATED_DESC)),
       kind_filter=st.one_of(st.just(""), st.sampled_from(KINDS)),
       ws_filter=st.one_of(st.just(""), st.sampled_from(WORKSPACES)))
def test_peer_list_answers_equal_the_reference_evaluator(
    served: Served, tmp_path: Path, rows: list[tuple[str, str, str, str]],
    grant: admin_pb2.Grant, page_size: int, order: int, kind_filter: str, ws_filter: str,
) -> None:
    prop_node, mirror = served.node, served.mirror
    n = next(served.examples)
    new_rows = [(_own(n, ws), kind, f"e{n}-{i}", team, owner)
                for i, (ws, kind, team, owner) in enumerate(rows)]
    drawn, grant = grant, admin_pb2.Grant()
    grant.CopyFrom(drawn)  # examples are reused across runs: never edit the drawn message
    grant.peer = f"prop{n}"
    grant.workspaces[:] = [_own(n, w) for w in drawn.workspaces]
    ws_filter = _own(n, ws_filter)

    with Client(prop_node.address, prop_node.credentials("admin")) as admin, \
            Client(prop_node.address, prop_node.credentials("client")) as local:
        for ws, kind, rid, team, owner in new_rows:
            local.command.Execute(put(ws, kind, rid, team=team, owner=owner))
        mirror.extend(new_rows)
        token = admin.admin.InvitePeer(admin_pb2.InvitePeerRequest(name=grant.peer)).token
        # Naming a never-shareable kind is refused outright, even when also excluded.
        if (not grant.workspaces and not grant.teams) or "credential" in grant.kinds:
            with pytest.raises(grpc.RpcError) as err:
                admin.admin.CreateGrant(admin_pb2.CreateGrantRequest(grant=grant))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            event("grant refused")
            return
        admin.admin.CreateGrant(admin_pb2.CreateGrantRequest(grant=grant))
    outbound = asyncio.run(join(token, tmp_path / f"joiner-{n}"))

    never_shared = {"credential"}
    scope_kinds = set(grant.kinds) - set(grant.excluded_kinds) - never_shared
    all_ws = not grant.workspaces or "*" in grant.workspaces
    with Client(outbound.address, outbound.credentials()) as peer:
        request = query_pb2.ListResourcesRequest(page_size=page_size, order=order,
                                                 kind=kind_filter, workspace=ws_filter)
        if (kind_filter and kind_filter not in scope_kinds) or \
                (ws_filter and not all_ws and ws_filter not in grant.workspaces):
            with pytest.raises(grpc.RpcError) as err:
                peer.query.ListResources(request)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            event("filter outside the grant refused")
            return
        got: list[Row] = []
        while True:
            resp = peer.query.ListResources(request)
            assert len(resp.resources) <= (min(page_size, grant.row_cap) if grant.row_cap
                                           else page_size)
            got += [(r.workspace, r.kind, r.id, r.team, r.owner) for r in resp.resources]
            if not resp.next_page_token:
                break
            request.page_token = resp.next_page_token
    expected = {r for r in mirror if reference_visible(grant, r, never_shared)
                and (not kind_filter or r[1] == kind_filter)
                and (not ws_filter or r[0] == ws_filter)}
    assert len(got) == len(set(got)), "a row was served twice across pages"
    assert set(got) == expected
    event("answer compared" + (" (non-empty)" if expected else " (empty)"))




async def test_cli_invites_grants_lists_and_revokes(
    node_factory: NodeFactory, b: NodeProcess, peering: Peering
) -> None:
    a = node_factory(name="a")
    invited = run_cli(b, "peers", "invite", "a", "--ttl-s", "300")
    assert invited.returncode == 0, invited.stderr
    token = json.loads(invited.stdout)["token"]
    bad = run_cli(b, "grants", "create", "--peer", "a", "--kinds", "task,credential",
                      "--workspaces", "acme")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr
    assert "never shared" in bad.stderr
    created = run_cli(b, "grants", "create", "--peer", "a", "--kinds", "task",
                          "--workspaces", "acme", "--row-cap", "2", "--expires-in-s", "3600")
    assert created.returncode == 0, created.stderr
    grant = json.loads(created.stdout)
    assert grant["row_cap"] == 2 and grant["workspaces"] == ["acme"]
    joined = run_cli(a, "peers", "join", token)
    assert joined.returncode == 0, joined.stderr
    assert json.loads(joined.stdout)["name"] == "b"
    listed = json.loads(run_cli(b, "peers", "list", "--json").stdout)
    assert [(p["name"], p["state"]) for p in listed["peers"]] == [("a", "ACTIVE")]
    shown = json.loads(run_cli(b, "grants", "show", grant["name"]).stdout)
    assert shown["peer"] == "a"
    async with peering.outbound(a, "b").client() as peer:
        rows, _ = await list_all(peer)
        assert keys(rows) == {(ws, k, i) for ws, k, i, _, _ in SEED
                              if ws == "acme" and k == "task"}
        assert run_cli(b, "grants", "revoke", grant["name"]).returncode == 0
        await expect_error(list_all(peer), grpc.StatusCode.PERMISSION_DENIED, "NO_GRANT")
        assert run_cli(b, "peers", "revoke", "a", "--reason", "done").returncode == 0
        with pytest.raises(grpc.aio.AioRpcError):
            await list_all(peer)
    # (--replace gets past the local check that b is recorded, to reach b's refusal.)
    again = run_cli(a, "peers", "join", token, "--replace")
    assert again.returncode == 1 and "PERMISSION_DENIED" in again.stderr


async def test_admin_validates_grants_and_pages_peers_and_grants(b: NodeProcess) -> None:
    async with b.client("admin") as admin:
        err = await expect_error(admin.admin.CreateGrant(admin_pb2.CreateGrantRequest(
            grant=admin_pb2.Grant(peer="Bad Name", kinds=["credential", "nope"], row_cap=-1,
                                  workspaces=["bad ws"]))), grpc.StatusCode.INVALID_ARGUMENT)
        assert set(bad_fields(err)) >= {"grant.peer", "grant.kinds", "grant.kinds[1]",
                                        "grant.row_cap", "grant.workspaces[0]"}
        err = await expect_error(admin.admin.CreateGrant(admin_pb2.CreateGrantRequest(
            grant=admin_pb2.Grant(peer="nobody", kinds=["task"]))),
            grpc.StatusCode.INVALID_ARGUMENT)
        assert bad_fields(err) == ["grant.workspaces"]
        await expect_error(admin.admin.CreateGrant(admin_pb2.CreateGrantRequest(
            grant=admin_pb2.Grant(peer="nobody", kinds=["task"], workspaces=["*"]))),
            grpc.StatusCode.FAILED_PRECONDITION, "PEER_UNKNOWN")
        for i in range(5):
            await admin.admin.InvitePeer(admin_pb2.InvitePeerRequest(name=f"peer{i}"))
            await admin.admin.CreateGrant(admin_pb2.CreateGrantRequest(grant=admin_pb2.Grant(
                peer=f"peer{i}", kinds=["task"], workspaces=["acme"])))
        # One live grant per peer keeps "what may this peer see" a single answer.
        await expect_error(admin.admin.CreateGrant(admin_pb2.CreateGrantRequest(
            grant=admin_pb2.Grant(peer="peer0", kinds=["note"], workspaces=["acme"]))),
            grpc.StatusCode.FAILED_PRECONDITION, "GRANT_EXISTS")
        names, token = [], ""
        while True:
            page = await admin.admin.ListPeers(admin_pb2.ListPeersRequest(page_size=2,
                                                                          page_token=token))
            names += [p.name for p in page.peers]
            assert all(p.state == admin_pb2.PEER_STATE_INVITED for p in page.peers)
            token = page.next_page_token
            if not token:
                break
        assert names == [f"peer{i}" for i in range(5)]
        grants, token = [], ""
        while True:
            gpage = await admin.admin.ListGrants(admin_pb2.ListGrantsRequest(page_size=3,
                                                                             page_token=token))
            grants += list(gpage.grants)
            token = gpage.next_page_token
            if not token:
                break
        assert [g.peer for g in grants] == [f"peer{i}" for i in range(5)]
        await admin.admin.RevokeGrant(admin_pb2.RevokeGrantRequest(name=grants[0].name))
        live = await admin.admin.ListGrants(admin_pb2.ListGrantsRequest())
        assert len(live.grants) == 4
        every = await admin.admin.ListGrants(admin_pb2.ListGrantsRequest(include_revoked=True))
        assert len(every.grants) == 5
        await expect_error(admin.admin.GetGrant(admin_pb2.GetGrantRequest(
            name="grants/00000000-0000-0000-0000-000000000000")), grpc.StatusCode.NOT_FOUND)
        await expect_error(admin.admin.GetPeer(admin_pb2.GetPeerRequest(name="ghost")),
                           grpc.StatusCode.NOT_FOUND)
        await expect_error(admin.admin.SuspendPeer(admin_pb2.SuspendPeerRequest(name="peer1")),
                           grpc.StatusCode.FAILED_PRECONDITION, "PEER_STATE")


async def test_an_expired_grant_is_refused_and_a_raced_token_enrols_once(
    b: NodeProcess, peering: Peering, tmp_path: Path
) -> None:
    token = await peering.invite(b, "racer")
    outcomes = await asyncio.gather(
        *(peering.join_dir(token, tmp_path / f"racer-{i}") for i in range(4)),
        return_exceptions=True)
    won = [o for o in outcomes if not isinstance(o, BaseException)]
    lost = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(won) == 1 and len(lost) == 3
    assert {reason_of(e) for e in lost} == {"TOKEN_USED"}

    expire = timestamp_pb2.Timestamp()
    expire_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
    expire.FromDatetime(expire_at)
    await peering.grant(b, "racer", kinds=["task"], workspaces=["acme"], expire_time=expire)
    async with won[0].client() as peer:
        request = query_pb2.GetResourceRequest(key=key("acme", "task", "t1"))
        assert (await peer.query.GetResource(request)).resource.id == "t1"
        await wait_until(lambda: dt.datetime.now(dt.UTC) > expire_at, "the grant has expired")
        await expect_error(peer.query.GetResource(request), grpc.StatusCode.PERMISSION_DENIED,
                           "GRANT_EXPIRED")


async def test_a_peer_certificate_can_only_be_used_as_a_client(
    node_factory: NodeFactory, peering: Peering
) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    b = node_factory(name="b")
    token = await peering.invite(b, "joiner")
    peer = await peering.join_dir(token)
    leaf = x509.load_pem_x509_certificates(peer.cert.read_bytes())[0]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert len(leaf.subject) == 0, "no CN a TLS client could match as a host name"


async def test_every_enrolment_attempt_is_audited_including_refusals(
    node_factory: NodeFactory, peering: Peering
) -> None:
    import psycopg

    b = node_factory(name="b")
    token = await peering.invite(b, "twice")
    await peering.join_dir(token)
    with pytest.raises(grpc.aio.AioRpcError, match=r"already used"):
        await peering.join_dir(token)
    with psycopg.connect(b.env["TESSERA_STORE_DSN"]) as conn:
        rows = conn.execute(
            "SELECT outcome, status_code, reason FROM audit_log WHERE method = 'EnrollPeer'"
            " ORDER BY sequence").fetchall()
    assert rows == [("ALLOWED", "OK", ""),
                    ("DENIED_BY_POLICY", "PERMISSION_DENIED", "TOKEN_USED")]
