"""Unit tests of tessera.observability: metrics."""

from __future__ import annotations

import grpc
from prometheus_client.openmetrics.exposition import generate_latest

from tessera.observability import (
    Metrics,
    grpc_code_label,
)


def test_grpc_codes_are_labelled_as_go_servers_label_them() -> None:
    assert [grpc_code_label(c) for c in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED,
                                         grpc.StatusCode.INVALID_ARGUMENT,
                                         grpc.StatusCode.RESOURCE_EXHAUSTED)] == [
        "OK", "Canceled", "InvalidArgument", "ResourceExhausted"]


def test_rpc_exemplars_and_breaker_states_are_exported() -> None:
    metrics = Metrics()
    metrics.rpc_done("tessera.v1.QueryService", "Describe", grpc.StatusCode.NOT_FOUND, 0.002,
                     "cd" * 16)
    states = {"b": "open"}
    metrics.watch_breakers(lambda: states)
    metrics.watch_breakers(lambda: states)  # a restarted node re-attaches: no duplicate
    text = generate_latest(metrics.registry).decode()
    handled = next(ln for ln in text.splitlines()
                   if ln.startswith("grpc_server_handled_total{"))
    assert 'grpc_code="NotFound"' in handled and f'trace_id="{"cd" * 16}"' in handled
    assert 'tessera_federation_breaker_state{peer="b",state="open"} 1.0' in text
    assert 'tessera_federation_breaker_state{peer="b",state="closed"} 0.0' in text
