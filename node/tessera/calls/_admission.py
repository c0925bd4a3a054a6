"""Admission of peer calls: peer state and grant, looked up afresh on every call."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

from tessera.calls._caller import Access, Caller, authorize
from tessera.core.errors import PermissionDenied
from tessera.grants import Grant, GrantStore, PeerState, Scope
from tessera.pki import IdentityKind

#: The only methods a peer may reach; everything else is denied before the servicer runs.
PEER_METHODS = frozenset({
    ("tessera.v1.QueryService", "GetResource"),
    ("tessera.v1.QueryService", "ListResources"),
    ("tessera.v1.QueryService", "SearchResources"),
    ("tessera.v1.QueryService", "Describe"),
    ("tessera.v1.CommandService", "Execute"),
    # A peer follows and cancels the operations its Execute calls started (e.g. an agent
    # run): each answers the caller's own operations only, another's is NOT_FOUND.
    ("tessera.v1.CommandService", "GetOperation"),
    ("tessera.v1.CommandService", "WatchOperation"),
    ("tessera.v1.CommandService", "CancelOperation"),
    ("tessera.v1.EventService", "Subscribe"),
    ("tessera.v1.EventService", "Ack"),
    ("tessera.v1.EventService", "DeleteSubscription"),
    # Its own certificate only (the servicer signs for the caller's identity).
    ("tessera.v1.AdminService", "RenewPeerCertificate"),
})

_STATE_DENIALS = {
    PeerState.INVITED: ("has not completed enrolment", "PEER_NOT_ENROLLED"),
    PeerState.SUSPENDED: ("is suspended", "PEER_SUSPENDED"),
    PeerState.REVOKED: ("is revoked", "PEER_REVOKED"),
}


class GrantAdmission:
    """The node's `Admission`: local identities by kind, peers by state and grant.

    No grant is cached, so revoking a grant or a peer is effective on the next call on
    every replica; the price is one indexed query per peer call.
    """

    def __init__(self, grants: GrantStore, never_shared: Collection[str] = ()) -> None:
        self.grants = grants
        self.never_shared = frozenset(never_shared)

    async def admit(self, caller: Caller, access: Access) -> Caller:
        """Return the caller with `peer` and `grant` set, or raise PermissionDenied."""
        if caller.identity.kind is not IdentityKind.NODE or access is Access.ADMIN:
            authorize(access, caller.identity)
            return caller
        found = await self.grants.admission(caller.uri)
        if found.peer is None:
            raise PermissionDenied(f"{caller.uri} is not a peer of this node",
                                   reason="PEER_UNKNOWN")
        peer = found.peer
        if peer.state in _STATE_DENIALS:
            what, reason = _STATE_DENIALS[peer.state]
            raise PermissionDenied(f"peer {peer.name} {what}", reason=reason)
        if (caller.service, caller.method) not in PEER_METHODS:
            raise PermissionDenied(
                f"peers may not call {caller.service}/{caller.method}",
                reason="METHOD_NOT_GRANTED",
            )
        if found.grant is None:
            raise PermissionDenied(f"peer {peer.name} has no grant on this node",
                                   reason="NO_GRANT")
        if not found.grant_live:
            raise PermissionDenied(f"the grant of peer {peer.name} has expired",
                                   reason="GRANT_EXPIRED")
        return dataclasses.replace(caller, peer=peer.name, grant=found.grant,
                                   scope=Scope.of(found.grant, self.never_shared))


def peer_scope(caller: Caller) -> Scope | None:
    """The scope admission evaluated for this call: None for local identities.

    Fails closed: a peer identity without an admitted grant and scope gets nothing.
    """
    if caller.identity.kind is not IdentityKind.NODE:
        return None
    if not isinstance(caller.grant, Grant) or not isinstance(caller.scope, Scope):
        raise PermissionDenied("the caller has no grant on this node", reason="NO_GRANT")
    return caller.scope
