"""Prometheus metrics with an injected registry, so tests read exact values."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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

    def rpc_done(self, service: str, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """Record one finished RPC."""
        self.handled.labels(service, method, code.name).inc()
        self.handling.labels(service, method).observe(seconds)
