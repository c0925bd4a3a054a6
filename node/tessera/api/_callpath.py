"""The one call path every RPC goes through: identity, admission, limits, audit, errors.

`CallPath` is a `grpc.aio` server interceptor that wraps each method handler, so the
checks run with the call's `auth_context()` before the servicer sees the request.
Servicers read the authenticated caller with `tessera.calls.current_caller()`.

Requests arrive here as bytes and are decoded here, so a message that does not decode (a
corrupt protobuf, invalid UTF-8) answers INVALID_ARGUMENT and is audited like any call;
every decoded request then passes `check_message` (NUL characters, non-finite numbers,
over-long strings, anywhere in it) before its servicer sees it. Unknown methods answer
UNIMPLEMENTED and are audited too. A write with an effect commits its audit record in its
own transaction (`tessera.calls.audit_intent()`); every other call's record is
group-committed by the auditor before the call is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Container
from typing import Any

import grpc
from google.protobuf.message import Message
from opentelemetry import trace

from tessera.api._drain import Drain
from tessera.api._validate import check_message
from tessera.calls import (
    OPEN_SERVICES,
    Access,
    Admission,
    Auditor,
    Caller,
    CallOutcome,
    KindAdmission,
    Limiter,
    authenticate,
    bind_audit_intent,
    bind_caller,
    caller_or_none,
    required_access,
    split_method,
)
from tessera.core import errors
from tessera.core.status import grpc_status, internal_status, status_code_of
from tessera.observability import ACCESS_LOGGER, Tracing, access_line, active_trace_id
from tessera.store import STORE_UNAVAILABLE, AuditIntent, StoreHealth, unavailable

log = logging.getLogger(__name__)
#: One line per finished call (trace id, request id, identity, method, code, duration).
access_log = logging.getLogger(ACCESS_LOGGER)
#: Codes that mean the server failed the call (OpenTelemetry's rule for server spans).
_SERVER_FAULTS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL,
                            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS})


class CallPath(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps every handler: authenticate, admit, rate-limit, decode, check, audit, map errors.

    The order is fixed here, once, for every method: identity -> store up? -> admission
    (peer state, grant) -> rate limit -> decode -> generic checks -> handler; the auditor
    sees every outcome, denials included, and the call is answered only after its record
    is durable.
    """

    def __init__(
        self,
        trust_domain: str,
        *,
        denied_serials: Container[int] = frozenset(),
        on_done: Callable[[str, str, grpc.StatusCode, float, str], None] | None = None,
        admission: Admission | None = None,
        limiter: Limiter | None = None,
        auditor: Auditor | None = None,
        identified: bool = True,
        drain: Drain | None = None,
        store_health: StoreHealth | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.trust_domain = trust_domain
        self.denied_serials = denied_serials
        self.on_done = on_done
        self.admission: Admission = admission or KindAdmission()
        self.limiter = limiter
        self.auditor = auditor
        #: False only on the enrolment listener, where callers have no certificate yet
        #: (the token is the credential): calls are still audited and mapped here.
        self.identified = identified
        #: Counts calls in flight and refuses new ones once the node stops.
        self.drain = drain
        #: While PostgreSQL is known to be down, store-backed calls answer UNAVAILABLE at once.
        self.store_health = store_health
        self.tracing = tracing or Tracing.disabled()
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        # The wrapped handler of a served method depends on its path alone (the servers'
        # handlers are fixed once they start): built once, not per call. Paths nobody
        # serves are not kept, so callers cannot grow this.
        wrapped = self._wrapped.get(details.method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(details)
        wrapped = self._wrap(handler, details.method)
        if handler is not None and wrapped is not None and len(self._wrapped) < 4096:
            self._wrapped[details.method] = wrapped
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler | None,
              full_method: str) -> grpc.RpcMethodHandler | None:
        """`handler` inside the call path (None: a path this server does not serve)."""
        service, method = _split(full_method)
        if handler is None and not self.identified:
            # The enrolment listener's callers have no certificate: a method it does not
            # serve costs them no audit row (grpcio answers UNIMPLEMENTED), so unknown
            # methods cannot flood the log past the enrolment rate limit.
            return None
        if handler is None:
            # grpcio would answer UNIMPLEMENTED itself, unaudited: answer it here instead.
            # A streaming handler serves any call shape; it reads no request.
            return grpc.stream_stream_rpc_method_handler(self._stream_response(
                _unimplemented(full_method), Access.ANY_AUTHENTICATED, service, method,
                None, request_stream=True, opens=False, served=False))
        access = required_access(service, method)
        # Requests reach the wrapper as bytes (no deserializer): it decodes them itself.
        decode = handler.request_deserializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary_response(handler.unary_unary, access, service, method, decode),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream_response(handler.unary_stream, access, service, method, decode),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary_response(handler.stream_unary, access, service, method, decode,
                                     request_stream=True),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._stream_response(handler.stream_stream, access, service, method, decode,
                                      request_stream=True),
                response_serializer=handler.response_serializer,
            )
        return handler

    async def _enter(self, context: grpc.aio.ServicerContext, access: Access, service: str,
                     method: str) -> Caller | None:
        if self.drain is not None:
            self.drain.admit(service)
        if not self.identified:
            return None
        peer = authenticate(context.auth_context(), self.trust_domain, self.denied_serials)
        # 16 random hex digits, as uuid4().hex[:16] gave: a correlation id, not a secret,
        # so from the process's PRNG rather than a getrandom() system call per call.
        caller = Caller(peer.identity, peer.serial, peer.fingerprint_sha256,
                        f"{random.getrandbits(64):016x}", service, method,
                        not_after=peer.not_after)
        bind_caller(caller)
        if access is not Access.ANY_AUTHENTICATED:
            if self.store_health is not None:
                self.store_health.check()
            caller = await self.admission.admit(caller, access)
            bind_caller(caller)
            if self.limiter is not None:
                await self.limiter.check(caller)
        return caller

    def _intent(self, context: grpc.aio.ServicerContext, service: str, method: str,
                request: Any, started: float) -> AuditIntent | None:
        """The record a write's effect commits with (see `tessera.calls.audit_intent`)."""
        if self.auditor is None or service in OPEN_SERVICES:
            bind_audit_intent(None)
            return None
        auditor = self.auditor

        def outcome() -> CallOutcome:
            return CallOutcome(
                caller=caller_or_none(), service=service, method=method,
                code=grpc.StatusCode.OK, reason="", request=request, response_bytes=0,
                latency_s=time.perf_counter() - started, trace_id=_trace_id(context))

        intent = auditor.intent(outcome)
        bind_audit_intent(intent)
        return intent

    async def _finish(
        self, context: grpc.aio.ServicerContext, service: str, method: str, request: Any,
        started: float, exc: BaseException | None, response: Any = None,
        response_bytes: int = 0, messages_out: int | None = None, cancelled: bool = False,
        intent: AuditIntent | None = None, served: bool = True,
    ) -> None:
        """Audit and count the outcome, then abort with the mapped status on error."""
        status: grpc.Status | None = None
        code, reason = grpc.StatusCode.OK, ""
        if cancelled:  # the client went away: record it, there is nobody to answer
            code, reason = grpc.StatusCode.CANCELLED, "CANCELLED"
        if isinstance(exc, NotImplementedError):
            # The generated base servicer's answer for a method this server does not serve.
            exc = errors.Unimplemented(f"{service}/{method} is not served here")
        elif exc is not None and isinstance(exc, STORE_UNAVAILABLE):
            # The database did not answer: a retryable outage, never an internal error.
            if self.store_health is not None:
                self.store_health.suspect()
            exc = unavailable(exc)
        if isinstance(exc, errors.TesseraError):
            status, code, reason = grpc_status(exc), status_code_of(exc), exc.reason
        elif exc is not None:
            # The caller's request id, so the error, its log line and its span match.
            request_id = getattr(caller_or_none(), "request_id", "") or uuid.uuid4().hex[:16]
            log.error("unhandled error in %s/%s (request id %s)", service, method, request_id,
                      exc_info=exc)
            status, code, reason = internal_status(request_id), grpc.StatusCode.INTERNAL, "INTERNAL"
        if response is not None and not response_bytes:
            response_bytes = response.ByteSize()
        elapsed = time.perf_counter() - started
        trace_id, sequence = active_trace_id() or _trace_id(context), None
        # A successful write committed its record with its effect: it is durable already.
        committed = exc is None and intent is not None and intent.is_committed
        if self.auditor is not None and service not in OPEN_SERVICES and not committed:
            try:
                if self.store_health is not None:
                    # No waiting for the pool while the database is known to be down.
                    self.store_health.check()
                sequence = await self.auditor.record(CallOutcome(
                    caller=caller_or_none(), service=service, method=method, code=code,
                    reason=reason, request=request, response_bytes=response_bytes,
                    latency_s=elapsed, trace_id=trace_id, messages_out=messages_out,
                ))
            except errors.TesseraError as audit_exc:
                # No call is answered unaudited: the caller gets the audit failure instead.
                status, code = grpc_status(audit_exc), status_code_of(audit_exc)
        sampled = _report(service, method, code, elapsed, trace_id, sequence)
        if self.on_done is not None:
            # A path nobody serves is the caller's invention: counted under fixed labels,
            # so callers cannot add series to the metrics (the audit row keeps the path).
            self.on_done(*((service, method) if served else _UNSERVED), code, elapsed,
                         trace_id if sampled else "")
        if status is not None and not cancelled:
            await context.abort_with_status(status)

    async def _opened(self, context: grpc.aio.ServicerContext, service: str, method: str,
                      request: Any, started: float) -> None:
        """Audit that a stream opened: a stream can last for days, so its close row alone
        would leave it invisible while it runs. Its close is the usual outcome row."""
        if self.auditor is None or service in OPEN_SERVICES:
            return
        await self.auditor.record(CallOutcome(
            caller=caller_or_none(), service=service, method=method,
            code=grpc.StatusCode.OK, reason="STREAM_OPENED", request=request,
            response_bytes=0, latency_s=time.perf_counter() - started,
            trace_id=active_trace_id() or _trace_id(context)))

    def _unary_response(self, behavior: Any, access: Access, service: str, method: str,
                        decode: Decoder | None, *, request_stream: bool = False) -> Any:
        """Wrap a handler that answers one message (unary, or client-streaming)."""
        async def wrapped(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            request: Any = None
            intent: AuditIntent | None = None
            started = time.perf_counter()
            with self._tracked(stream=False):
                try:
                    await self._enter(context, access, service, method)
                    if request_stream:
                        request = None  # a stream has no single message for the query hash
                        arg = _decoded_stream(raw, decode)
                    else:
                        request = arg = _decoded(raw, decode)
                        _check(request, raw)
                    intent = self._intent(context, service, method, request, started)
                    response = await behavior(arg, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await self._finish(context, service, method, request, started, exc)
                    raise  # unreachable: _finish aborted the call
                await self._finish(context, service, method, request, started, None,
                                   response, intent=intent)
                return response

        return self.tracing.server_unary(f"{service}/{method}", wrapped)

    def _stream_response(self, behavior: Any, access: Access, service: str, method: str,
                         decode: Decoder | None, *, request_stream: bool = False,
                         opens: bool = True, served: bool = True) -> Any:
        """Wrap a handler that streams its answer (server-streaming, or bidi such as
        reflection, which too must see only authenticated, unrevoked callers)."""
        async def wrapped(raw: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            request: Any = None
            intent: AuditIntent | None = None
            started = time.perf_counter()
            sent = count = 0
            with self._tracked(stream=True):
                try:
                    await self._enter(context, access, service, method)
                    if request_stream:
                        arg = _decoded_stream(raw, decode)
                    else:
                        request = arg = _decoded(raw, decode)
                        _check(request, raw)
                    if opens:  # not for a method that is not served: it opens nothing
                        await self._opened(context, service, method, request, started)
                    intent = self._intent(context, service, method, request, started)
                    result = behavior(arg, context)
                    if inspect.isawaitable(result):
                        # A handler that writes with context.write() (grpc's own health
                        # Watch) instead of yielding: it streams until it returns.
                        await result
                    else:
                        async for item in result:
                            sent += item.ByteSize()
                            count += 1
                            yield item
                except grpc.aio.AbortError:
                    raise
                except (asyncio.CancelledError, GeneratorExit) as exc:
                    if isinstance(exc, GeneratorExit) or self.drain is None \
                            or not self.drain.ending:
                        # A stream usually ends by its client leaving: audit that too.
                        await self._finish(context, service, method, request, started, None,
                                           response_bytes=sent, messages_out=count,
                                           cancelled=True, served=served)
                        raise
                    # The stopping node ended the stream: say so, rather than CANCELLED.
                    task = asyncio.current_task()
                    if task is not None:
                        task.uncancel()
                    await self._finish(context, service, method, request, started,
                                       self.drain.ended_stream(), response_bytes=sent,
                                       messages_out=count, served=served)
                    raise  # unreachable: _finish aborted the call
                except Exception as exc:
                    await self._finish(context, service, method, request, started, exc,
                                       response_bytes=sent, messages_out=count, served=served)
                    raise  # unreachable: _finish aborted the call
                await self._finish(context, service, method, request, started, None,
                                   response_bytes=sent, messages_out=count, intent=intent,
                                   served=served)

        return self.tracing.server_stream(f"{service}/{method}", wrapped)

    def _tracked(self, *, stream: bool) -> contextlib.AbstractContextManager[None]:
        return self.drain.track(stream=stream) if self.drain is not None \
            else contextlib.nullcontext()


Decoder = Callable[[bytes], Any]
#: The metric labels (service, method) of every call to a path this server does not serve.
_UNSERVED = ("unknown", "unknown")


def _split(full_method: str) -> tuple[str, str]:
    """(service, method) of a method path, whatever a caller sent as the path."""
    try:
        return split_method(full_method)
    except ValueError:
        return "", full_method


def _decoded(raw: Any, decode: Decoder | None) -> Any:
    """The request message of `raw` bytes; InvalidArgument when it is not one."""
    if decode is None or not isinstance(raw, bytes):
        return raw
    try:
        message = decode(raw)
    except Exception:
        # upb raises DecodeError (and a few others) for corrupt wire data or invalid UTF-8.
        owner = getattr(decode, "__self__", None)
        name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "the request type")
        raise errors.InvalidArgument([errors.FieldViolation(
            "request", f"is not a valid {name} message (corrupt protobuf encoding, or a "
                       "string that is not valid UTF-8)")]) from None
    return message


def _check(request: Any, wire: Any = None) -> None:
    """The checks every request gets (see `check_message`)."""
    if isinstance(request, Message):
        check_message(request, wire if isinstance(wire, bytes) else None)


async def _decoded_stream(raws: AsyncIterator[Any], decode: Decoder | None) -> AsyncIterator[Any]:
    async for raw in raws:
        message = _decoded(raw, decode)
        _check(message, raw)
        yield message


def _unimplemented(full_method: str) -> Any:
    """A streaming behaviour that answers UNIMPLEMENTED for a method nobody serves."""
    async def behavior(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        raise errors.Unimplemented(f"method {full_method[:200]!r} is not served by this node")
        yield  # pragma: no cover - makes this an async generator

    return behavior


def _report(service: str, method: str, code: grpc.StatusCode, elapsed: float, trace_id: str,
            sequence: int | None) -> bool:
    """The call's access-log line and span attributes; True if the call's span is sampled."""
    caller = caller_or_none()
    peer = ""
    if caller is not None:
        peer = caller.peer or (caller.identity.name if caller.identity.kind.value == "node" else "")
    # Health probes and reflection come every few seconds from load balancers: DEBUG.
    level = logging.DEBUG if service in OPEN_SERVICES else logging.INFO
    if access_log.isEnabledFor(level):  # the fields are built only for a line written
        access_line(level, f"{service}/{method} {code.name} {elapsed * 1000:.1f} ms", {
            "trace_id": trace_id, "request_id": caller.request_id if caller else "",
            "identity": caller.uri if caller else "", "peer": peer,
            "method": f"/{service}/{method}", "code": code.name,
            "duration_ms": round(elapsed * 1000, 3), "audit_sequence": sequence})
    span = trace.get_current_span()
    if not span.is_recording():
        return False
    span.set_attributes({
        "rpc.system": "grpc", "rpc.service": service, "rpc.method": method,
        "rpc.grpc.status_code": code.value[0],
        "tessera.caller.kind": caller.identity.kind.value if caller else "unauthenticated",
        "tessera.caller.peer": peer, "tessera.request_id": caller.request_id if caller else "",
    })
    if sequence is not None:
        span.set_attribute("tessera.audit.sequence", sequence)
    if code in _SERVER_FAULTS:
        span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
    return bool(span.get_span_context().trace_flags.sampled)


def _trace_id(context: grpc.aio.ServicerContext) -> str:
    """The trace id of a W3C traceparent header, if the caller sent one."""
    for k, v in context.invocation_metadata() or ():
        if k == "traceparent" and isinstance(v, str):
            parts = v.split("-")
            if len(parts) == 4 and len(parts[1]) == 32:
                return parts[1]
    return ""
