"""Prometheus metrics with an injected registry, so tests read exact values.

Also the package's entry to tracing (`_tracing`) and structured logs (`_logs`): observability
sits low in the layers, so every package can count, trace and log with it.

Every metric name the node exports is defined here (the audit writer's, in
`tessera.audit`, register into the same registry). Labels are bounded: services, methods,
codes, states, peer and grant names; never a request, resource or trace id (trace ids
travel as exemplars, which the OpenMetrics exposition shows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tessera.observability._logs import (
    ACCESS_LOGGER,
    JsonFormatter,
    access_line,
    configure_logging,
    log_fields,
)
from tessera.observability._tracing import (
    Tracing,
    active_trace_id,
    make_sampler,
    span,
    trace_metadata,
    traced,
)

__all__ = [
    "ACCESS_LOGGER",
    "BREAKER_STATES",
    "JsonFormatter",
    "Metrics",
    "Tracing",
    "access_line",
    "active_trace_id",
    "configure_logging",
    "grpc_code_label",
    "log_fields",
    "make_sampler",
    "span",
    "trace_metadata",
    "traced",
]

#: States a peer's circuit breaker can be in (see tessera.federation).
BREAKER_STATES = ("closed", "half_open", "open")


def grpc_code_label(code: grpc.StatusCode) -> str:
    """The `grpc_code` label value as Go's gRPC servers write it: "OK", "NotFound"..."""
    if code is grpc.StatusCode.CANCELLED:
        return "Canceled"
    if code is grpc.StatusCode.OK:
        return "OK"
    return "".join(part.capitalize() for part in code.name.split("_"))


_CODE_LABELS = {code: grpc_code_label(code) for code in grpc.StatusCode}


class Metrics:
    """The node's metrics, registered in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.handled = Counter(
            "grpc_server_handled_total", "RPCs completed on the server, by status code.",
            ["grpc_service", "grpc_method", "grpc_code"], registry=self.registry,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds", "Time to answer an RPC.",
            ["grpc_service", "grpc_method"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self._rpc_children: dict[tuple[str, str, grpc.StatusCode], tuple[Counter, Histogram]] = {}
        self.cert_expiry = Gauge(
            "tessera_certificate_expiry_timestamp_seconds",
            "Unix time at which the node's serving certificate expires.",
            registry=self.registry,
        )
        self.cert_renewals = Counter(
            "tessera_certificate_renewals_total",
            "Certificate renewals and re-enrolments, by identity and result (ok, failed).",
            ["identity", "result"], registry=self.registry,
        )
        self.cert_state = Gauge(
            "tessera_certificate_state",
            "1 for the current renewal state of each managed certificate, else 0.",
            ["identity", "state"], registry=self.registry,
        )
        self.cert_renewal_urgent = Gauge(
            "tessera_certificate_renewal_urgent",
            "1 while a managed certificate has less than 1/6 of its lifetime left (renewal "
            "is overdue: alert on it), else 0.",
            ["identity"], registry=self.registry,
        )
        self.peer_cert_expiry = Gauge(
            "tessera_peer_certificate_expiry_timestamp_seconds",
            "Unix time at which the client certificate held for calling each peer expires.",
            ["peer"], registry=self.registry,
        )
        self.peer_cert_renewals = Counter(
            "tessera_peer_certificate_renewals_total",
            "Renewals of the certificates held for calling peers, by peer and result.",
            ["peer", "result"], registry=self.registry,
        )
        self.peer_cert_urgent = Gauge(
            "tessera_peer_certificate_renewal_urgent",
            "1 while the certificate held for calling a peer has less than 1/6 of its "
            "lifetime left, else 0.",
            ["peer"], registry=self.registry,
        )
        self.denied_serials = Gauge(
            "tessera_denied_serials",
            "Certificate serials the node refuses, by source (deny_list, crl).",
            ["source"], registry=self.registry,
        )
        self.ratelimit_backend = Gauge(
            "tessera_ratelimit_backend",
            "1 for the backend deciding rate limits now (valkey, local), else 0.",
            ["backend"], registry=self.registry,
        )
        self.ratelimit_decisions = Counter(
            "tessera_ratelimit_decisions_total",
            "Rate-limit decisions by grant ('local' for local identities), method class and "
            "decision (allowed, rejected).",
            ["grant", "method_class", "decision"], registry=self.registry,
        )

        self.peer_calls = Counter(
            "tessera_federation_peer_calls_total",
            "Calls to peers of a fanned-out query, by peer and outcome (ok, denied, offline).",
            ["peer", "outcome"], registry=self.registry,
        )
        self.peer_call_seconds = Histogram(
            "tessera_federation_peer_call_seconds", "Time a peer took to answer a fanned-out call.",
            ["peer"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.cache_lookups = Counter(
            "tessera_federation_cache_lookups_total",
            "Offline-cache lookups for an unreachable peer, by peer and result (hit, miss).",
            ["peer", "result"], registry=self.registry,
        )

    def rpc_done(self, service: str, method: str, code: grpc.StatusCode, seconds: float,
                 trace_id: str = "") -> None:
        """Record one finished RPC; a sampled call's trace id becomes the exemplar."""
        exemplar = {"trace_id": trace_id} if trace_id else None
        key = (service, method, code)
        children = self._rpc_children.get(key)
        if children is None:  # labels() takes a lock and builds its key on every call
            children = (self.handled.labels(service, method, _CODE_LABELS[code]),
                        self.handling.labels(service, method))
            if len(self._rpc_children) < 4096:
                self._rpc_children[key] = children
        children[0].inc(exemplar=exemplar)
        children[1].observe(seconds, exemplar=exemplar)

    def watch_breakers(self, states: Callable[[], Mapping[str, str]]) -> None:
        """Export `tessera_federation_breaker_state{peer,state}`, read at scrape time."""
        old = getattr(self, "_breakers", None)
        if old is not None:  # a node restarted in the same process re-attaches its peers
            self.registry.unregister(old)
        self._breakers = _BreakerCollector(states)
        self.registry.register(self._breakers)


class _BreakerCollector(Collector):
    """One gauge per peer and breaker state: 1 for the state it is in now, else 0."""

    def __init__(self, states: Callable[[], Mapping[str, str]]) -> None:
        self._states = states

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "tessera_federation_breaker_state",
            "1 for the state each peer's circuit breaker is in now (closed, half_open, open).",
            labels=["peer", "state"])
        for peer, now in sorted(self._states().items()):
            for state in BREAKER_STATES:
                family.add_metric([peer, state], 1.0 if state == now else 0.0)
        yield family
