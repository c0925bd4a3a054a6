"""The one call path every RPC goes through: identity, admission, limits, audit, errors.

`CallPath` is a `grpc.aio` server interceptor that wraps each method handler, so the
checks run with the call's `auth_context()` before the servicer sees the request.
Servicers read the authenticated caller with `tessera.calls.current_caller()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Container
from typing import Any

import grpc
import psycopg
import psycopg_pool

from tessera.api._drain import Drain
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
    bind_caller,
    caller_or_none,
    required_access,
    split_method,
)
from tessera.core import errors
from tessera.core.status import grpc_status, internal_status, status_code_of

log = logging.getLogger(__name__)


class CallPath(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps every handler: authenticate, admit, rate-limit, audit, map errors to status.

    The order is fixed here, once, for every method: identity -> admission (peer state,
    grant) -> rate limit -> handler; the auditor sees every outcome, denials included,
    and the call is answered only after its record is durable.
    """

    def __init__(
        self,
        trust_domain: str,
        *,
        denied_serials: Container[int] = frozenset(),
        on_done: Callable[[str, str, grpc.StatusCode, float], None] | None = None,
        admission: Admission | None = None,
        limiter: Limiter | None = None,
        auditor: Auditor | None = None,
        identified: bool = True,
        drain: Drain | None = None,
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
                self._unary_response(handler.unary_unary, access, service, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream_response(handler.unary_stream, access, service, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary_response(handler.stream_unary, access, service, method,
                                    request_stream=True),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._stream_response(handler.stream_stream, access, service, method,
                                     request_stream=True),
                request_deserializer=handler.request_deserializer,
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
        caller = Caller(peer.identity, peer.serial, peer.fingerprint_sha256,
                        uuid.uuid4().hex[:16], service, method, not_after=peer.not_after)
        bind_caller(caller)
        if access is not Access.ANY_AUTHENTICATED:
            caller = await self.admission.admit(caller, access)
            bind_caller(caller)
            if self.limiter is not None:
                await self.limiter.check(caller)
        return caller

    async def _finish(
        self, context: grpc.aio.ServicerContext, service: str, method: str, request: Any,
        started: float, exc: BaseException | None, response: Any = None,
        response_bytes: int = 0, messages_out: int | None = None, cancelled: bool = False,
    ) -> None:
        """Audit and count the outcome, then abort with the mapped status on error."""
        status: grpc.Status | None = None
        code, reason = grpc.StatusCode.OK, ""
        if cancelled:  # the client went away: record it, there is nobody to answer
            code, reason = grpc.StatusCode.CANCELLED, "CANCELLED"
        if isinstance(exc, NotImplementedError):
            # The generated base servicer's answer for a method this server does not serve.
            exc = errors.Unimplemented(f"{service}/{method} is not served here")
        if isinstance(exc, psycopg.OperationalError | psycopg_pool.PoolTimeout):
            # A database that went away (or is restarting) is UNAVAILABLE, never INTERNAL.
            # (Bridge until the call path's store-health watch of issue 11 merges.)
            exc = errors.Unavailable(f"PostgreSQL is unavailable ({type(exc).__name__}); "
                                     "retry shortly")
        if isinstance(exc, errors.TesseraError):
            status, code, reason = grpc_status(exc), status_code_of(exc), exc.reason
        elif exc is not None:
            request_id = uuid.uuid4().hex[:16]
            log.error("unhandled error in %s/%s (request id %s)", service, method, request_id,
                      exc_info=exc)
            status, code, reason = internal_status(request_id), grpc.StatusCode.INTERNAL, "INTERNAL"
        if response is not None and not response_bytes:
            response_bytes = response.ByteSize()
        elapsed = time.perf_counter() - started
        if self.auditor is not None and service not in OPEN_SERVICES:
            try:
                await self.auditor.record(CallOutcome(
                    caller=caller_or_none(), service=service, method=method, code=code,
                    reason=reason, request=request, response_bytes=response_bytes,
                    latency_s=elapsed, trace_id=_trace_id(context), messages_out=messages_out,
                ))
            except errors.TesseraError as audit_exc:
                # No call is answered unaudited: the caller gets the audit failure instead.
                status, code = grpc_status(audit_exc), status_code_of(audit_exc)
        if self.on_done is not None:
            self.on_done(service, method, code, elapsed)
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
            trace_id=_trace_id(context)))

    def _unary_response(self, behavior: Any, access: Access, service: str, method: str,
                        *, request_stream: bool = False) -> Any:
        """Wrap a handler that answers one message (unary, or client-streaming)."""
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            # A stream of requests has no single message for the audit's query hash.
            audited = None if request_stream else request
            started = time.perf_counter()
            with self._tracked(stream=False):
                try:
                    await self._enter(context, access, service, method)
                    response = await behavior(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await self._finish(context, service, method, audited, started, exc)
                    raise  # unreachable: _finish aborted the call
                await self._finish(context, service, method, audited, started, None, response)
                return response

        return wrapped

    def _stream_response(self, behavior: Any, access: Access, service: str, method: str,
                         *, request_stream: bool = False) -> Any:
        """Wrap a handler that streams its answer (server-streaming, or bidi such as
        reflection, which too must see only authenticated, unrevoked callers)."""
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            audited = None if request_stream else request
            started = time.perf_counter()
            sent = count = 0
            with self._tracked(stream=True):
                try:
                    await self._enter(context, access, service, method)
                    await self._opened(context, service, method, audited, started)
                    result = behavior(request, context)
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
                        await self._finish(context, service, method, audited, started, None,
                                           response_bytes=sent, messages_out=count,
                                           cancelled=True)
                        raise
                    # The stopping node ended the stream: say so, rather than CANCELLED.
                    task = asyncio.current_task()
                    if task is not None:
                        task.uncancel()
                    await self._finish(context, service, method, audited, started,
                                       self.drain.ended_stream(), response_bytes=sent,
                                       messages_out=count)
                    raise  # unreachable: _finish aborted the call
                except Exception as exc:
                    await self._finish(context, service, method, audited, started, exc,
                                       response_bytes=sent, messages_out=count)
                    raise  # unreachable: _finish aborted the call
                await self._finish(context, service, method, audited, started, None,
                                   response_bytes=sent, messages_out=count)

        return wrapped

    def _tracked(self, *, stream: bool) -> contextlib.AbstractContextManager[None]:
        return self.drain.track(stream=stream) if self.drain is not None \
            else contextlib.nullcontext()


def _trace_id(context: grpc.aio.ServicerContext) -> str:
    """The trace id of a W3C traceparent header, if the caller sent one."""
    for k, v in context.invocation_metadata() or ():
        if k == "traceparent" and isinstance(v, str):
            parts = v.split("-")
            if len(parts) == 4 and len(parts[1]) == 32:
                return parts[1]
    return ""
