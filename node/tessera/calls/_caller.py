"""Who is calling and what they may reach: the per-call domain types and pure policy.

The api layer's call path authenticates each call, binds its `Caller` here, and
servicers and domain code read it with `current_caller()`.
"""

from __future__ import annotations

import contextvars
import enum
from collections.abc import Callable, Container
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import grpc

from tessera.core import errors
from tessera.grants import Grant, Scope
from tessera.pki import IdentityKind, PeerCertificate, SpiffeId, identity_from_pem
from tessera.store import AuditIntent

ADMIN_SERVICE = "tessera.v1.AdminService"
#: Services that need no application identity beyond a verified certificate.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                           "grpc.reflection.v1.ServerReflection"})


@dataclass(frozen=True)
class Caller:
    """The authenticated caller of the current RPC."""

    identity: SpiffeId
    serial: int
    fingerprint_sha256: str
    request_id: str
    #: Full gRPC service and method name of the call.
    service: str = ""
    method: str = ""
    #: Peer name, when the caller is a peer node (set by the admission hook).
    peer: str = ""
    #: The grant that applies to this call, when the caller is a peer (set by admission).
    grant: Grant | None = None
    #: The grant's scope, evaluated once by admission; servicers push it into their SQL.
    scope: Scope | None = None
    #: When the client certificate expires (long-lived streams end then).
    not_after: datetime | None = None

    @property
    def uri(self) -> str:
        """The caller's identity URI."""
        return self.identity.uri

    @property
    def is_local(self) -> bool:
        """Local tools and admins act on this node's own data without a grant."""
        return self.identity.kind in (IdentityKind.CLIENT, IdentityKind.ADMIN)


_CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("tessera_caller")


def current_caller() -> Caller:
    """The caller of the RPC being served."""
    return _CALLER.get()


def caller_or_none() -> Caller | None:
    """The caller of the RPC being served, or None before it was identified."""
    return _CALLER.get(None)


def bind_caller(caller: Caller) -> None:
    """Make `caller` the current caller of this call (the call path's job)."""
    _CALLER.set(caller)


class Access(enum.Enum):
    """Who may call a method."""

    ANY_AUTHENTICATED = "any"
    LOCAL = "local"
    ADMIN = "admin"
    #: Peer nodes only, admitted by peer state and grant (renewing their certificate).
    PEER = "peer"


#: AdminService methods that only peers call (their own certificate), not admins.
PEER_ADMIN_METHODS = frozenset({"RenewPeerCertificate"})


def split_method(full_method: str) -> tuple[str, str]:
    """('/pkg.Service/Method') -> ('pkg.Service', 'Method')."""
    _, service, method = full_method.split("/", 2)
    return service, method


def required_access(service: str, method: str) -> Access:
    """Pure policy of which identity kinds may reach a method (before any grant check)."""
    if service in OPEN_SERVICES:
        return Access.ANY_AUTHENTICATED
    if service == ADMIN_SERVICE:
        return Access.PEER if method in PEER_ADMIN_METHODS else Access.ADMIN
    # Peers (kind "node") reach Query/Command only through a grant: the node's admission
    # (tessera.grants.GrantAdmission) lets them in by peer state, method and grant, and the
    # default KindAdmission lets no peer in at all (default deny).
    return Access.LOCAL


def authorize(access: Access, identity: SpiffeId) -> None:
    """Raise PermissionDenied unless the identity's kind satisfies `access`."""
    if access is Access.ANY_AUTHENTICATED:
        return
    if access is Access.PEER:
        # Only an admission that checks peer state and grant may let a peer in; this
        # kind check alone admits nobody.
        raise errors.PermissionDenied(
            "only an admitted peer node may call this method", reason="PEER_REQUIRED")
    if access is Access.ADMIN and identity.kind is not IdentityKind.ADMIN:
        raise errors.PermissionDenied(
            f"{identity.kind.value} identities may not call the AdminService",
            reason="ADMIN_REQUIRED",
        )
    if access is Access.LOCAL and identity.kind is IdentityKind.NODE:
        raise errors.PermissionDenied(
            f"peer {identity.name} has no grant on this node", reason="NO_GRANT"
        )


def authenticate(
    auth_context: dict[str, list[bytes]] | Any, trust_domain: str, denied_serials: Container[int]
) -> PeerCertificate:
    """Identify the caller from its TLS-verified client certificate."""
    pems = list(auth_context.get("x509_pem_cert") or ())
    if len(pems) != 1:
        raise errors.Unauthenticated("a client certificate is required", reason="NO_CERTIFICATE")
    peer = identity_from_pem(pems[0])
    if peer.identity.trust_domain != trust_domain:
        raise errors.Unauthenticated(
            f"identity is from trust domain {peer.identity.trust_domain!r}, not {trust_domain!r}",
            reason="FOREIGN_TRUST_DOMAIN",
        )
    if peer.serial in denied_serials:
        raise errors.Unauthenticated("the client certificate is revoked", reason="CERT_REVOKED")
    # TLS checked validity at the handshake only; an HTTP/2 connection can outlive that.
    now = datetime.now(UTC)
    if now >= peer.not_after:
        raise errors.Unauthenticated("the client certificate has expired", reason="CERT_EXPIRED")
    if now < peer.not_before:
        raise errors.Unauthenticated("the client certificate is not valid yet",
                                     reason="CERT_NOT_YET_VALID")
    return peer


class Admission(Protocol):
    """Decides whether an authenticated caller may make this call (peers, grants)."""

    async def admit(self, caller: Caller, access: Access) -> Caller:
        """Return the caller, enriched (peer, grant), or raise PermissionDenied."""
        ...


class Limiter(Protocol):
    """Rate limiting of admitted calls."""

    async def check(self, caller: Caller) -> None:
        """Raise ResourceExhausted when the caller is over its limit."""
        ...


@dataclass(frozen=True)
class CallOutcome:
    """What happened to one call, for the audit log and metrics."""

    caller: Caller | None
    service: str
    method: str
    code: grpc.StatusCode
    reason: str
    request: Any
    response_bytes: int
    latency_s: float
    trace_id: str
    #: Messages a streaming call delivered (None for calls answering one message).
    messages_out: int | None = None


class Auditor(Protocol):
    """Records every call durably before it is answered."""

    async def record(self, outcome: CallOutcome) -> int | None:
        """Return once the record is durable: its audit sequence, when the log has one."""
        ...

    def intent(self, outcome: Callable[[], CallOutcome]) -> AuditIntent:
        """A record an effect can commit with; `outcome()` is the call as it stands."""
        ...


class KindAdmission:
    """The default admission: identity kinds only (admins for Admin, locals for the rest)."""

    async def admit(self, caller: Caller, access: Access) -> Caller:
        """Apply `authorize` to the caller's identity."""
        authorize(access, caller.identity)
        return caller
