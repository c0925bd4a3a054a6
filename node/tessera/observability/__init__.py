"""What an operator runs on: Prometheus metrics, OpenTelemetry tracing, structured logs.

Low in the layers (just above config), so every package can count, trace and log with it.
"""

from tessera.observability._logs import JsonFormatter, configure_logging, log_fields
from tessera.observability._metrics import Metrics
from tessera.observability._tracing import (
    Tracing,
    active_trace_id,
    make_sampler,
    span,
    trace_metadata,
    traced,
)

__all__ = [
    "JsonFormatter",
    "Metrics",
    "Tracing",
    "active_trace_id",
    "configure_logging",
    "log_fields",
    "make_sampler",
    "span",
    "trace_metadata",
    "traced",
]
