"""The one call path every RPC goes through: identity, authorisation, error mapping.

`CallPath` is a `grpc.aio` server interceptor that wraps each method handler, so the
checks run with the call's `auth_context()` before the servicer sees the request.
Servicers read the authenticated caller with `current_caller()`.
"""

from __future__ import annotations

import contextvars
import enum
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Container
from dataclasses import dataclass
from typing import Any

import grpc

from tessera import errors
from tessera.pki import IdentityKind, PeerCertificate, SpiffeId, identity_from_pem
from tessera.status import grpc_status, internal_status

log = logging.getLogger(__name__)

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


class Access(enum.Enum):
    """Who may call a method."""

    ANY_AUTHENTICATED = "any"
    LOCAL = "local"
    ADMIN = "admin"


def split_method(full_method: str) -> tuple[str, str]:
    """('/pkg.Service/Method') -> ('pkg.Service', 'Method')."""
    _, service, method = full_method.split("/", 2)
    return service, method


def required_access(service: str, method: str) -> Access:
    """Pure policy of which identity kinds may reach a method (before any grant check)."""
    if service in OPEN_SERVICES:
        return Access.ANY_AUTHENTICATED
    if service == ADMIN_SERVICE:
        return Access.ADMIN
    # Peers (kind "node") reach Query/Command/Event only through a grant; grants come with
    # the trust-boundary work, so until then only local identities are let in (default deny).
    return Access.LOCAL


def authorize(access: Access, identity: SpiffeId) -> None:
    """Raise PermissionDenied unless the identity's kind satisfies `access`."""
    if access is Access.ANY_AUTHENTICATED:
        return
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
    return peer


class CallPath(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps every handler: authenticate, authorise, then map errors to status codes."""

    def __init__(
        self,
        trust_domain: str,
        *,
        denied_serials: Container[int] = frozenset(),
        on_done: Callable[[str, str, grpc.StatusCode, float], None] | None = None,
    ) -> None:
        self.trust_domain = trust_domain
        self.denied_serials = denied_serials
        self.on_done = on_done

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        service, method = split_method(details.method)
        access = required_access(service, method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, access, service, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, access, service, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # client- and bidi-streaming methods are not part of the API

    def _enter(self, context: grpc.aio.ServicerContext, access: Access) -> Caller:
        peer = authenticate(context.auth_context(), self.trust_domain, self.denied_serials)
        authorize(access, peer.identity)
        caller = Caller(peer.identity, peer.serial, peer.fingerprint_sha256, uuid.uuid4().hex[:16])
        _CALLER.set(caller)
        return caller

    async def _fail(
        self, context: grpc.aio.ServicerContext, exc: BaseException, service: str, method: str
    ) -> None:
        if isinstance(exc, errors.TesseraError):
            await context.abort_with_status(grpc_status(exc))
        request_id = uuid.uuid4().hex[:16]
        log.error("unhandled error in %s/%s (request id %s)", service, method, request_id,
                  exc_info=exc)
        await context.abort_with_status(internal_status(request_id))

    def _done(self, service: str, method: str, context: grpc.aio.ServicerContext,
              started: float) -> None:
        if self.on_done is not None:
            code = context.code() if hasattr(context, "code") else None
            self.on_done(service, method, code or grpc.StatusCode.OK,
                         time.perf_counter() - started)

    def _unary(self, behavior: Any, access: Access, service: str, method: str) -> Any:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                self._enter(context, access)
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await self._fail(context, exc, service, method)
            finally:
                self._done(service, method, context, started)

        return wrapped

    def _stream(self, behavior: Any, access: Access, service: str, method: str) -> Any:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            try:
                self._enter(context, access)
                async for item in behavior(request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await self._fail(context, exc, service, method)
            finally:
                self._done(service, method, context, started)

        return wrapped
