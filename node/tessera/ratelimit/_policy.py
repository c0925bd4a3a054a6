"""Which limit applies to a call: its method class, its subject and the effective rate."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tessera.ratelimit._gcra import Limit

READ, SEARCH, COMMAND, EVENT, ADMIN = "read", "search", "command", "event", "admin"
#: Every method class, in the order they are shown.
METHOD_CLASSES = (READ, SEARCH, COMMAND, EVENT, ADMIN)

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


def parse_limits(setting: str, text: str) -> dict[str, Limit]:
    """Parse "read=200/400, search=20/40, admin=0" (rate per second / burst; 0 = unlimited).

    Raises ValueError with a message naming the setting and the fix.
    """
    limits: dict[str, Limit] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in METHOD_CLASSES:
            raise ValueError(f"{setting}: {item!r} must be <class>=<rate_per_s>/<burst> with a "
                             f"class among {', '.join(METHOD_CLASSES)}")
        rate_s, _, burst_s = value.partition("/")
        try:
            rate = float(rate_s)
            burst = int(burst_s) if burst_s.strip() else (max(1, round(rate)) if rate else 0)
        except ValueError:
            raise ValueError(f"{setting}: {item!r} needs numbers, e.g. {name}=50/100") from None
        if rate < 0 or burst < 0 or (rate > 0 and burst < 1):
            raise ValueError(f"{setting}: {item!r} needs rate >= 0 and burst >= 1")
        limits[name] = Limit(rate, burst)
    return limits


def grant_limit(grant: Any) -> Limit | None:
    """The limit a grant carries, if any (attributes `rate_per_s`, `burst`, or `rate_limit`)."""
    rate = getattr(grant, "rate_per_s", None)
    burst = getattr(grant, "burst", None)
    nested = getattr(grant, "rate_limit", None)
    if rate is None and nested is not None:
        rate, burst = getattr(nested, "rate_per_s", None), getattr(nested, "burst", None)
    if not isinstance(rate, int | float) or isinstance(rate, bool) or rate <= 0:
        return None
    b = burst if isinstance(burst, int) and not isinstance(burst, bool) and burst > 0 else None
    return Limit(float(rate), b if b is not None else max(1, round(rate)))


def effective_limit(grant: Any, klass: str, local: Mapping[str, Limit],
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


def subject_of(identity_uri: str, grant: Any) -> str:
    """What a limit is keyed by: the grant's name for peers, the identity for local callers."""
    name = getattr(grant, "name", None) if grant is not None else None
    if isinstance(name, str) and name:
        return name
    return identity_uri
