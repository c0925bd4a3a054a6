"""AdminService methods for peers and grants: thin adapters over tessera.grants/peering."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from tessera.api._convert import identity_to_pb, timestamp
from tessera.api._enrolment import enroll_pb
from tessera.api._runtime import Runtime
from tessera.api._validate import MAX_NAME, WORKSPACE_RE, Checker
from tessera.calls import current_caller
from tessera.core.errors import FieldViolation, InvalidArgument, PermissionDenied
from tessera.core.net import split_host_port
from tessera.core.pagination import PageTokenError, query_hash
from tessera.events import LOCAL_ORIGIN, pattern_problem
from tessera.grants import ALL_WORKSPACES, Grant, Peer, PeerState, Scope
from tessera.peering import (
    DEFAULT_TOKEN_TTL,
    MAX_TOKEN_TTL,
    PeerCertificateRenewal,
    load_outbound,
)
from tessera.store import Follow, FollowStore, Predicate, any_of
from tessera_client.pb import admin_pb2

PEER_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?$")
COMMAND_TYPE_RE = re.compile(r"^[a-z0-9._-]{1,128}$")
EVENT_TYPE_RE = re.compile(r"^[a-z0-9._*-]{1,128}$")
GRANT_NAME_RE = re.compile(r"^grants/[0-9a-f-]{36}$")
MAX_LIST = 100
#: A P-256 CSR is well under 1 KiB.
MAX_CSR_CHARS = 16 << 10

_STATES = {
    PeerState.INVITED: admin_pb2.PEER_STATE_INVITED,
    PeerState.ACTIVE: admin_pb2.PEER_STATE_ACTIVE,
    PeerState.SUSPENDED: admin_pb2.PEER_STATE_SUSPENDED,
    PeerState.REVOKED: admin_pb2.PEER_STATE_REVOKED,
}
_STATES_BACK = {v: k for k, v in _STATES.items()}


def peer_to_pb(rt: Runtime, p: Peer) -> admin_pb2.Peer:
    """Domain peer to protobuf."""
    return admin_pb2.Peer(
        name=p.name, identity=identity_to_pb(rt.peering.identity_of(p.name)),
        address=p.address, state=_STATES[p.state], certificate_serial=p.certificate_serial,
        create_time=timestamp(p.created_at), update_time=timestamp(p.updated_at),
        state_reason=p.state_reason, certificate_expire_time=timestamp(p.certificate_not_after),
    )


#: The window of a row budget given without one, and the longest window allowed.
DEFAULT_ROW_BUDGET_WINDOW_S = 3600
MAX_ROW_BUDGET_WINDOW_S = 30 * 86_400


def joined_to_pb(rt: Runtime) -> list[admin_pb2.JoinedPeer]:
    """The peers this node has joined, with the certificates it holds on them."""
    renewal: PeerCertificateRenewal = rt.peer_renewal
    return [
        admin_pb2.JoinedPeer(
            name=st.name, identity=st.identity, address=st.address, as_identity=st.as_identity,
            certificate_serial=format(st.serial, "x"),
            certificate_expire_time=timestamp(st.not_after), renew_time=timestamp(st.renew_at),
            renewal_state=st.state.value, last_error=st.last_error)
        for _, st in sorted(renewal.refresh().items())
    ]


def grant_to_pb(g: Grant) -> admin_pb2.Grant:
    """Domain grant to protobuf."""
    msg = admin_pb2.Grant(
        name=g.name, peer=g.peer, kinds=sorted(g.kinds), excluded_kinds=sorted(g.excluded_kinds),
        workspaces=sorted(g.workspaces), teams=sorted(g.teams), subject_user=g.subject_user,
        include_personal=g.include_personal, row_cap=g.row_cap,
        command_types=sorted(g.command_types), event_types=sorted(g.event_types),
        expire_time=timestamp(g.expire_time), create_time=timestamp(g.created_at),
        revoke_time=timestamp(g.revoked_at), revoked=g.revoked,
    )
    if g.rate_per_s or g.burst:
        msg.rate_limit.rate_per_s = g.rate_per_s
        msg.rate_limit.burst = g.burst
    if g.row_budget:
        msg.row_budget = g.row_budget
        msg.row_budget_window.seconds = g.row_budget_window_s
    return msg


def grant_from_pb(rt: Runtime, msg: admin_pb2.Grant, *, now: datetime) -> Grant:
    """Validate a grant request (every violation at once) and build the domain grant."""
    c = Checker()
    c.pattern("grant.peer", msg.peer, PEER_NAME_RE, "a peer name (1-64 of [a-z0-9-])")
    never = rt.cfg.store.never_shared_set
    if not msg.kinds:
        c.fail("grant.kinds", "name at least one kind (default deny: no kind, nothing to read)")
    for i, kind in enumerate(msg.kinds):
        c.kind(f"grant.kinds[{i}]", kind, rt.kinds)
        if kind in never:
            c.fail("grant.kinds", f"kind {kind!r} is never shared (store.never_shared_kinds)")
    for i, kind in enumerate(msg.excluded_kinds):
        c.kind(f"grant.excluded_kinds[{i}]", kind, rt.kinds)
    for i, ws in enumerate(msg.workspaces):
        if ws != ALL_WORKSPACES:
            c.pattern(f"grant.workspaces[{i}]", ws, WORKSPACE_RE,
                      "'*' or 1-128 characters of [A-Za-z0-9._-]")
    for i, team in enumerate(msg.teams):
        if not team or len(team) > MAX_NAME:
            c.fail(f"grant.teams[{i}]", f"must be 1-{MAX_NAME} characters")
    if not msg.workspaces and not msg.teams:
        c.fail("grant.workspaces", "name at least one workspace ('*' for all) or team")
    c.max_len("grant.subject_user", msg.subject_user, MAX_NAME)
    if msg.row_cap < 0:
        c.fail("grant.row_cap", "must be 0 (node default) or positive")
    if msg.row_budget < 0:
        c.fail("grant.row_budget", "must be 0 (no budget) or positive")
    window_s = msg.row_budget_window.seconds if msg.HasField("row_budget_window") else 0
    if msg.HasField("row_budget_window") and (
            msg.row_budget_window.nanos or not 1 <= window_s <= MAX_ROW_BUDGET_WINDOW_S):
        c.fail("grant.row_budget_window",
               f"must be whole seconds from 1 to {MAX_ROW_BUDGET_WINDOW_S} (30 days)")
    if msg.HasField("row_budget_window") and not msg.row_budget:
        c.fail("grant.row_budget_window", "is only meaningful with grant.row_budget")
    for i, ct in enumerate(msg.command_types):
        c.pattern(f"grant.command_types[{i}]", ct, COMMAND_TYPE_RE, "1-128 of [a-z0-9._-]")
    for i, et in enumerate(msg.event_types):
        c.pattern(f"grant.event_types[{i}]", et, EVENT_TYPE_RE, "1-128 of [a-z0-9._*-]")
    rate = msg.rate_limit
    if not math.isfinite(rate.rate_per_s) or rate.rate_per_s < 0:
        c.fail("grant.rate_limit.rate_per_s", "must be a finite number >= 0")
    if rate.burst < 0:
        c.fail("grant.rate_limit.burst", "must be >= 0")
    expire = c.timestamp("grant.expire_time", msg.expire_time, msg.HasField("expire_time"))
    if expire is not None and expire <= now:
        c.fail("grant.expire_time", "must be in the future")
    c.done()
    return Grant(
        name="", peer=msg.peer, kinds=frozenset(msg.kinds),
        excluded_kinds=frozenset(msg.excluded_kinds), workspaces=frozenset(msg.workspaces),
        teams=frozenset(msg.teams), subject_user=msg.subject_user,
        include_personal=msg.include_personal, row_cap=msg.row_cap,
        command_types=frozenset(msg.command_types), event_types=frozenset(msg.event_types),
        rate_per_s=rate.rate_per_s, burst=rate.burst, expire_time=expire,
        row_budget=msg.row_budget,
        row_budget_window_s=(window_s or DEFAULT_ROW_BUDGET_WINDOW_S) if msg.row_budget else 0,
    )


def _check_peer_name(name: str) -> None:
    c = Checker()
    c.pattern("name", name, PEER_NAME_RE, "a peer name (1-64 of [a-z0-9-])")
    c.done()


#: Most type patterns one follow may name.
MAX_FOLLOW_PATTERNS = 32


def follow_to_pb(f: Follow) -> admin_pb2.PeerFollow:
    """A follow row as protobuf (lag: origin time of the newest event to its storing)."""
    lag = 0.0
    if f.last_event_time is not None and f.last_received_at is not None:
        lag = max(0.0, (f.last_received_at - f.last_event_time).total_seconds())
    return admin_pb2.PeerFollow(
        peer=f.peer, enabled=f.enabled, type_patterns=f.type_patterns, cursor=f.cursor,
        state=f.state if f.enabled else "stopped", last_error=f.last_error,
        received=f.received, duplicates=f.duplicates,
        last_event_time=timestamp(f.last_event_time),
        last_received_time=timestamp(f.last_received_at), lag_seconds=lag,
        update_time=timestamp(f.updated_at))


def _check_grant_name(name: str) -> None:
    c = Checker()
    c.pattern("name", name, GRANT_NAME_RE, "grants/<uuid>")
    c.done()


def _page(rt: Runtime, token: str, query: dict[str, Any]) -> tuple[str, list[Any] | None]:
    qhash = query_hash(query)
    if not token:
        return qhash, None
    try:
        return qhash, rt.tokens.decode(token, query=qhash, caller=current_caller().uri)
    except PageTokenError as exc:
        raise InvalidArgument([FieldViolation("page_token", str(exc))]) from None


class PeerGrantAdmin:
    """Peers and grants for AdminServicer (admin identities only, by the call path)."""

    rt: Runtime

    async def InvitePeer(
        self, request: admin_pb2.InvitePeerRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.InvitePeerResponse:
        c = Checker()
        c.pattern("name", request.name, PEER_NAME_RE, "1-64 characters of [a-z0-9-]")
        ttl = DEFAULT_TOKEN_TTL
        if request.HasField("token_ttl"):
            asked = c.duration("token_ttl", request.token_ttl)
            if asked is not None and not timedelta(0) < asked <= MAX_TOKEN_TTL:
                c.fail("token_ttl", "must be more than 0 and at most 15 minutes")
            ttl = asked or ttl
        if request.advertised_address:
            try:
                split_host_port(request.advertised_address, min_port=1)
            except ValueError:
                c.fail("advertised_address", "must be host:port")
        c.done()
        invited = await self.rt.peering.invite(request.name, ttl=ttl,
                                                   address=request.advertised_address)
        return admin_pb2.InvitePeerResponse(
            peer=peer_to_pb(self.rt, invited.peer), token=invited.token,
            expire_time=timestamp(invited.expire_time))

    async def EnrollPeer(
        self, request: admin_pb2.EnrollPeerRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.EnrollPeerResponse:
        # Normally reached on the enrolment listener; an admin may call it here too.
        return await enroll_pb(self.rt.peering, request, identity_to_pb(self.rt.identity))

    async def RenewPeerCertificate(
        self, request: admin_pb2.RenewPeerCertificateRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RenewPeerCertificateResponse:
        # Reached only by an admitted peer (Access.PEER): active, with a live grant.
        caller = current_caller()
        if not caller.peer:
            raise PermissionDenied("only an admitted peer may renew its certificate",
                                   reason="PEER_REQUIRED")
        c = Checker()
        if not request.csr_pem:
            c.fail("csr_pem", "is required")
        c.max_len("csr_pem", request.csr_pem, MAX_CSR_CHARS)
        c.done()
        renewed = await self.rt.peering.renew(
            peer=caller.peer, presented_serial=caller.serial, csr_pem=request.csr_pem.encode())
        return admin_pb2.RenewPeerCertificateResponse(
            certificate_chain_pem=renewed.chain_pem.decode(),
            trust_roots_pem=renewed.roots_pem.decode())

    async def ListPeers(
        self, request: admin_pb2.ListPeersRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListPeersResponse:
        c = Checker()
        size = c.page_size("page_size", request.page_size)
        if request.state and request.state not in _STATES_BACK:
            c.fail("state", "unknown peer state")
        c.done()
        state = _STATES_BACK.get(request.state)
        qhash, after = _page(self.rt, request.page_token, {"peers": state})
        peers = await self.rt.grants.list_peers(
            state=state, limit=size + 1, after=after[0] if after else None)
        token = ""
        if len(peers) > size:
            peers = peers[:size]
            token = self.rt.tokens.encode(query=qhash, caller=current_caller().uri,
                                          position=[peers[-1].name])
        joined = joined_to_pb(self.rt) if not request.page_token else []
        follows = ([follow_to_pb(f) for f in await self._follows().list()]
                   if not request.page_token else [])
        return admin_pb2.ListPeersResponse(peers=[peer_to_pb(self.rt, p) for p in peers],
                                           next_page_token=token, joined=joined,
                                           follows=follows)

    def _follows(self) -> FollowStore:
        return FollowStore(self.rt.pool)

    def _poke_followers(self) -> None:
        if self.rt.followers is not None:
            self.rt.followers.poke()

    async def FollowPeer(
        self, request: admin_pb2.FollowPeerRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.PeerFollow:
        c = Checker()
        c.pattern("name", request.name, PEER_NAME_RE, "a joined peer's name (1-64 of [a-z0-9-])")
        if request.name == LOCAL_ORIGIN:
            c.fail("name", f"{LOCAL_ORIGIN!r} names this node's own events in origin filters; "
                           "rejoin the peer under another name (tessera peers join --as)")
        elif request.name == self.rt.cfg.node.name:
            # A peer's events are shown with its local name as their source: under this
            # node's own name they would pass for this node's own events (a peer names
            # itself, and a join without --as records it under that name).
            c.fail("name", f"{request.name!r} is this node's own name; rejoin the peer "
                           "under another name (tessera peers join --as)")
        if len(request.type_patterns) > MAX_FOLLOW_PATTERNS:
            c.fail("type_patterns", f"at most {MAX_FOLLOW_PATTERNS} patterns")
        for i, p in enumerate(request.type_patterns):
            problem = pattern_problem(p)
            if problem:
                c.fail(f"type_patterns[{i}]", problem)
        c.done()
        try:
            load_outbound(self.rt.paths.data_dir, request.name)  # PEER_UNKNOWN if not joined
        except (OSError, ValueError, KeyError):
            raise InvalidArgument([FieldViolation(
                "name", "the joined peer's record is unreadable; join it again")]) from None
        follow = await self._follows().follow(request.name,
                                              sorted(set(request.type_patterns)))
        self._poke_followers()
        return follow_to_pb(follow)

    async def UnfollowPeer(
        self, request: admin_pb2.UnfollowPeerRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.PeerFollow:
        _check_peer_name(request.name)
        follow = await self._follows().unfollow(request.name)
        self._poke_followers()
        return follow_to_pb(follow)

    async def ForgetPeer(
        self, request: admin_pb2.ForgetPeerRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ForgetPeerResponse:
        _check_peer_name(request.name)
        deleted = await self._follows().forget(request.name)
        return admin_pb2.ForgetPeerResponse(deleted=deleted)

    async def GetPeer(
        self, request: admin_pb2.GetPeerRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Peer:
        _check_peer_name(request.name)
        return peer_to_pb(self.rt, await self.rt.grants.get_peer(request.name))

    async def SuspendPeer(
        self, request: admin_pb2.SuspendPeerRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Peer:
        _check_peer_name(request.name)
        peer = await self.rt.peering.suspend(request.name, request.reason[:MAX_NAME])
        return peer_to_pb(self.rt, peer)

    async def RevokePeer(
        self, request: admin_pb2.RevokePeerRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Peer:
        _check_peer_name(request.name)
        peer = await self.rt.peering.revoke(request.name, request.reason[:MAX_NAME])
        return peer_to_pb(self.rt, peer)

    async def CreateGrant(
        self, request: admin_pb2.CreateGrantRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Grant:
        if not request.HasField("grant"):
            raise InvalidArgument([FieldViolation("grant", "is required")])
        grant = grant_from_pb(self.rt, request.grant, now=datetime.now(UTC))
        return grant_to_pb(await self.rt.grants.create_grant(grant))

    async def ListGrants(
        self, request: admin_pb2.ListGrantsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListGrantsResponse:
        c = Checker()
        size = c.page_size("page_size", request.page_size)
        c.pattern("peer", request.peer, PEER_NAME_RE, "a peer name", required=False)
        c.done()
        qhash, after = _page(self.rt, request.page_token,
                             {"grants": request.peer, "revoked": request.include_revoked})
        grants = await self.rt.grants.list_grants(
            peer=request.peer, include_revoked=request.include_revoked, limit=size + 1,
            after=after)
        token = ""
        if len(grants) > size:
            grants = grants[:size]
            last = grants[-1]
            assert last.created_at is not None
            token = self.rt.tokens.encode(
                query=qhash, caller=current_caller().uri,
                position=[last.created_at.isoformat(), last.name.removeprefix("grants/")])
        return admin_pb2.ListGrantsResponse(grants=[grant_to_pb(g) for g in grants],
                                            next_page_token=token)

    async def GetGrant(
        self, request: admin_pb2.GetGrantRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Grant:
        _check_grant_name(request.name)
        return grant_to_pb(await self.rt.grants.get_grant(request.name))

    async def RevokeGrant(
        self, request: admin_pb2.RevokeGrantRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Grant:
        _check_grant_name(request.name)
        return grant_to_pb(await self.rt.grants.revoke_grant(request.name))

    async def PreviewGrants(
        self, request: admin_pb2.PreviewGrantsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.PreviewGrantsResponse:
        c = Checker()
        c.pattern("peer", request.peer, PEER_NAME_RE, "a peer name (1-64 of [a-z0-9-])")
        c.done()
        await self.rt.grants.get_peer(request.peer)  # NotFound names an unknown peer
        now = datetime.now(UTC)
        grants, after = [], None
        while True:  # every grant of the peer, page by page
            page = await self.rt.grants.list_grants(peer=request.peer, include_revoked=False,
                                                    limit=MAX_LIST + 1, after=after)
            grants += page[:MAX_LIST]
            if len(page) <= MAX_LIST:
                break
            last = page[MAX_LIST - 1]
            after = [last.created_at, last.name.removeprefix("grants/")]
        never = self.rt.cfg.store.never_shared_set
        out = admin_pb2.PreviewGrantsResponse()
        conditions: list[Predicate] = []
        for g in grants:
            if g.expire_time is not None and g.expire_time <= now:
                continue
            scope = Scope.of(g, never)
            predicate = scope.predicate()
            by_kind = await self.rt.store.count_by_kind(predicate)
            conditions.append(predicate)
            out.grants.append(admin_pb2.GrantPreview(
                grant=grant_to_pb(g), readable_kinds=sorted(scope.kinds),
                rows_in_scope=sum(by_kind.values()), rows_by_kind=by_kind))
        if conditions:
            union = any_of(conditions)
            out.rows_in_scope = sum((await self.rt.store.count_by_kind(union)).values())
        return out
