"""OpenTelemetry tracing: one server span per RPC, child spans below it, W3C propagation.

Tracing is off unless `[tracing] endpoint` is set; then spans are exported in batches over
OTLP/gRPC. The call path opens the server span (`Tracing.server_span`) and makes the node's
tracer current for the call, so code below it (store, Valkey, peer calls) opens children
with `span(...)` / `@traced(...)` without any tracer passed down, and a node that does not
trace pays one context-variable read per child.

Sampling: a trace's root is sampled with probability `sample_ratio` (by trace id, so nodes
with the same ratio agree and a fanned-out trace stays whole). A peer's incoming
`traceparent` never forces sampling on unless `trust_remote_parent` is set: by default its
sampled flag is ignored and this node's ratio decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tessera.config import TracingConfig

if TYPE_CHECKING:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

P = ParamSpec("P")
T = TypeVar("T")

#: The tracer of the node whose call is running (None: not tracing, or outside a call).
_TRACER: contextvars.ContextVar[Tracer | None] = contextvars.ContextVar(
    "tessera_tracer", default=None)
#: W3C trace context only: baggage is never sent to, nor taken from, peers.
_PROPAGATOR = TraceContextTextMapPropagator()
_HEADERS = frozenset({"traceparent", "tracestate"})
#: How long a stopping node waits for its last spans to reach the collector.
_CLOSE_FLUSH_S = 2.0
log = logging.getLogger(__name__)


def make_sampler(ratio: float, trust_remote_parent: bool) -> Sampler:
    """Sample roots by `ratio`; follow a remote parent's decision only when trusted.

    Local parents (this node's own spans) are always followed, so a sampled server span
    keeps all its children.
    """
    by_ratio = TraceIdRatioBased(ratio)
    if trust_remote_parent:
        return ParentBased(root=by_ratio)
    return ParentBased(root=by_ratio, remote_parent_sampled=by_ratio,
                       remote_parent_not_sampled=by_ratio)


class Tracing:
    """The node's tracer provider and exporter; `enabled` only with an endpoint."""

    def __init__(self, cfg: TracingConfig, node_name: str) -> None:
        self.provider: TracerProvider | None = None
        self.tracer: Tracer | None = None
        if not cfg.endpoint:
            return
        # Imported here: every CLI command imports this module, few export spans.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        credentials = None
        if not cfg.insecure:
            roots = Path(cfg.ca_file).read_bytes() if cfg.ca_file else None
            credentials = grpc.ssl_channel_credentials(roots)
        self._exporter = _Exporter(OTLPSpanExporter(
            endpoint=cfg.endpoint, insecure=cfg.insecure, credentials=credentials,
            timeout=cfg.export_timeout_s))
        self.provider = TracerProvider(
            sampler=make_sampler(cfg.sample_ratio, cfg.trust_remote_parent),
            resource=Resource.create({"service.name": cfg.service_name,
                                      "service.instance.id": node_name,
                                      "tessera.node": node_name}),
        )
        self.provider.add_span_processor(BatchSpanProcessor(
            self._exporter, schedule_delay_millis=cfg.export_delay_ms))
        self.tracer = self.provider.get_tracer("tessera")

    @classmethod
    def disabled(cls) -> Tracing:
        """A Tracing that makes no spans."""
        return cls(TracingConfig(), "")

    @property
    def enabled(self) -> bool:
        """Whether spans are made and exported."""
        return self.tracer is not None

    async def close(self) -> None:
        """Export what is buffered, waiting at most 2 s, then stop the exporter.

        A collector that is down must not hold the node's stop for the exporter's retries
        (up to `export_timeout_s`): past 2 s the export in flight is cut short.
        """
        provider = self.provider
        if provider is None:
            return
        flush = asyncio.ensure_future(asyncio.to_thread(provider.force_flush))
        try:
            await asyncio.wait_for(asyncio.shield(flush), _CLOSE_FLUSH_S)
        except TimeoutError:
            log.warning("tracing: the collector took over %.0f s; the last spans are dropped",
                        _CLOSE_FLUSH_S)
        await asyncio.to_thread(self._exporter.shutdown)  # closes the channel: export ends
        await asyncio.gather(flush, return_exceptions=True)
        await asyncio.to_thread(provider.shutdown)

    @contextlib.contextmanager
    def server_span(self, name: str,
                    metadata: Iterable[tuple[str, Any]] | None) -> Iterator[Span | None]:
        """The span of one incoming RPC, continuing the caller's W3C trace context.

        While it is open, the node's tracer is current, so `span()` opens its children.
        """
        if self.tracer is None:
            yield None
            return
        carrier = {k: v for k, v in metadata or () if k in _HEADERS and isinstance(v, str)}
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        token = _TRACER.set(self.tracer)
        try:
            with self.tracer.start_as_current_span(
                    name, context=parent, kind=SpanKind.SERVER, record_exception=False,
                    set_status_on_exception=False) as current:
                yield current
        finally:
            with contextlib.suppress(ValueError):  # a stream resumed in another context
                _TRACER.reset(token)


    def server_unary(self, name: str, handler: Callable[[Any, Any], Awaitable[Any]],
                     ) -> Callable[[Any, Any], Awaitable[Any]]:
        """`handler(request, context)` run inside its RPC's server span (itself if off)."""
        if self.tracer is None:
            return handler

        async def traced(request: Any, context: Any) -> Any:
            with self.server_span(name, context.invocation_metadata()):
                return await handler(request, context)

        return traced

    def server_stream(self, name: str, handler: Callable[[Any, Any], AsyncIterator[Any]],
                      ) -> Callable[[Any, Any], AsyncIterator[Any]]:
        """A streaming `handler(request, context)` inside its RPC's server span."""
        if self.tracer is None:
            return handler

        async def traced(request: Any, context: Any) -> AsyncIterator[Any]:
            with self.server_span(name, context.invocation_metadata()):
                async for item in handler(request, context):
                    yield item

        return traced


def span(name: str, kind: SpanKind = SpanKind.INTERNAL,
         **attributes: str | int | float | bool,
         ) -> contextlib.AbstractContextManager[Span | None]:
    """A child of the current span, when the running call is traced; else nothing.

    An exception marks the span as an error by its type only (its message may carry data
    the trace backend must not see).
    """
    tracer = _TRACER.get()
    if tracer is None:
        return _NO_SPAN  # tracing off: no generator, no allocation
    return _child(tracer, name, kind, attributes)


_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()


class _Exporter(SpanExporter):
    """The OTLP exporter, whose shutdown may be called early (and then again, quietly)."""

    def __init__(self, inner: OTLPSpanExporter) -> None:
        self._inner = inner
        self._closed = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._inner.export(spans)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._inner.force_flush(timeout_millis)

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self._inner.shutdown()


@contextlib.contextmanager
def _child(tracer: Tracer, name: str, kind: SpanKind,
           attributes: dict[str, str | int | float | bool]) -> Iterator[Span]:
    with tracer.start_as_current_span(name, kind=kind, attributes=attributes,
                                      record_exception=False,
                                      set_status_on_exception=False) as current:
        try:
            yield current
        except BaseException as exc:
            current.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise


def traced(name: str, kind: SpanKind = SpanKind.INTERNAL,
           **attributes: str | int | float | bool,
           ) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Decorate a coroutine function so each call is a child span named `name`."""
    def wrap(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(fn)
        async def inner(*args: P.args, **kwargs: P.kwargs) -> T:
            if _TRACER.get() is None:
                return await fn(*args, **kwargs)
            with span(name, kind, **attributes):
                return await fn(*args, **kwargs)
        return inner
    return wrap


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """`traceparent` (and `tracestate`) of the current span, for an outgoing call."""
    if _TRACER.get() is None:
        return ()
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return tuple(carrier.items())


def active_trace_id() -> str:
    """The current span's trace id as 32 hex digits, '' outside any span."""
    ctx = get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
