"""AdminService.GetRateLimitStatus: a grant's or local identity's limits, as protobuf."""

from __future__ import annotations

from google.protobuf import duration_pb2

from tessera.api._convert import timestamp
from tessera.api._peers_admin import GRANT_NAME_RE
from tessera.api._runtime import Runtime
from tessera.core.errors import FieldViolation, InvalidArgument
from tessera.grants import Grant
from tessera.pki import SpiffeId
from tessera_client.pb import admin_pb2


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
    grant: Grant | None = None
    if not subject.startswith("spiffe://"):
        grant = await rt.grants.get_grant(subject)  # NotFound for an unknown grant
    status = await rt.limiter.status(subject, grant)
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
