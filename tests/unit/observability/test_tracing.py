"""Unit tests of tessera.observability: tracing."""

from __future__ import annotations

import pytest
from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    TraceFlags,
    set_span_in_context,
)

from tessera.observability import (
    Tracing,
    make_sampler,
    span,
    trace_metadata,
)

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C


def _remote(sampled: bool) -> Context:
    ctx = SpanContext(TRACE_ID, 0xB7AD6B7169203331, is_remote=True,
                      trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else 0))
    return set_span_in_context(NonRecordingSpan(ctx))


@pytest.mark.parametrize(("ratio", "trust", "parent_sampled", "expected"), [
    (0.0, False, True, False),   # a peer's sampled flag does not force sampling on
    (0.0, True, True, True),     # ... unless remote parents are trusted
    (1.0, False, False, True),   # untrusted: this node's ratio decides either way
    (1.0, True, False, False),   # trusted: a not-sampled parent is followed too
])
def test_a_remote_parent_decides_sampling_only_when_trusted(
        ratio: float, trust: bool, parent_sampled: bool, expected: bool) -> None:
    sampler = make_sampler(ratio, trust)
    result = sampler.should_sample(_remote(parent_sampled), TRACE_ID, "call")
    assert (result.decision is Decision.RECORD_AND_SAMPLE) is expected


def test_disabled_tracing_makes_no_spans_and_sends_no_headers() -> None:
    tracing = Tracing.disabled()
    assert not tracing.enabled

    async def handler(request: object, context: object) -> object:
        return request

    assert tracing.server_unary("svc/m", handler) is handler
    with span("store get") as current:
        assert current is None
    assert trace_metadata() == ()
