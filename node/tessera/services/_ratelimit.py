"""AdminService.GetRateLimitStatus: a grant's or local identity's limits, as protobuf."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf import duration_pb2

from tessera.errors import FieldViolation, InvalidArgument
from tessera.pki import SpiffeId
from tessera.ratelimit import RateLimiter
from tessera.runtime import Runtime
from tessera.services._convert import timestamp
from tessera.services._peers_admin import GRANT_NAME_RE
from tessera_client.pb import admin_pb2


@dataclass(frozen=True)
class _Named:
    """A grant known only by name: it carries no rate, so the peer defaults apply."""

    name: str


async def rate_limit_status(rt: Runtime, subject: str) -> admin_pb2.RateLimitStatus:
    """Effective limits per method class and recent rejections of `subject`."""
    subject = subject.strip()
    valid = bool(GRANT_NAME_RE.match(subject))
    if not valid and subject.startswith("spiffe://"):
        try:
            SpiffeId.parse(subject)
            valid = True
        except ValueError:
            valid = False
    if not valid:
        raise InvalidArgument([FieldViolation(
            "subject", "name a grant (grants/<uuid>) or a local identity URI "
            "(spiffe://<trust-domain>/<kind>/<name>)")])
    limiter: RateLimiter | None = rt.extras.get("ratelimiter")
    if limiter is None:
        return admin_pb2.RateLimitStatus(subject=subject, enabled=False)
    grant: Any = None
    if not subject.startswith("spiffe://"):
        grants = rt.extras.get("grants")
        # NotFound for an unknown grant; without a grant store the name gets peer defaults.
        grant = await grants.get_grant(subject) if grants is not None else _Named(subject)
    status = await limiter.status(subject, grant)
    return admin_pb2.RateLimitStatus(
        subject=status.subject, enabled=status.enabled, backend=status.backend,
        recent_window=duration_pb2.Duration(seconds=status.window_s),
        limits=[admin_pb2.MethodClassRateLimit(
            method_class=c.method_class,
            limit=admin_pb2.RateLimit(rate_per_s=c.limit.rate_per_s, burst=c.limit.burst),
            source=c.source, recent_rejections=c.recent_rejections,
            last_rejection_time=timestamp(c.last_rejection),
        ) for c in status.classes],
    )
