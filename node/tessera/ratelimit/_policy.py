"""Which limit applies to a call: its method class, its subject and the effective rate."""

from __future__ import annotations

from collections.abc import Mapping

from tessera.config import ADMIN, COMMAND, EVENT, READ, SEARCH, Limit
from tessera.grants import Grant

_SERVICE_CLASSES = {
    "tessera.v1.CommandService": COMMAND,
    "tessera.v1.EventService": EVENT,
    "tessera.v1.AdminService": ADMIN,
}


def method_class(service: str, method: str) -> str:
    """The class a method is limited in; searches cost far more than reads."""
    if service == "tessera.v1.QueryService":
        return SEARCH if method == "SearchResources" else READ
    return _SERVICE_CLASSES.get(service, READ)


def grant_limit(grant: Grant) -> Limit | None:
    """The limit a grant carries, if it sets one (a rate above 0)."""
    if grant.rate_per_s <= 0:
        return None
    burst = grant.burst if grant.burst > 0 else max(1, round(grant.rate_per_s))
    return Limit(float(grant.rate_per_s), burst)


def effective_limit(grant: Grant | None, klass: str, local: Mapping[str, Limit],
                    peer: Mapping[str, Limit]) -> tuple[Limit, str]:
    """The limit of one method class and where it comes from (grant, default_local/peer).

    A grant's one rate applies to each class separately: a peer reading at full rate can
    still run a command. Admin calls are never a peer's, so they use the local default.
    """
    if grant is None:
        return local.get(klass, Limit(0, 0)), "default_local"
    own = grant_limit(grant)
    if own is not None and klass != ADMIN:
        return own, "grant"
    return peer.get(klass, Limit(0, 0)), "default_peer"


def subject_of(identity_uri: str, grant: Grant | None) -> str:
    """What a limit is keyed by: the grant's name for peers, the identity for local callers."""
    return grant.name if grant is not None and grant.name else identity_uri
