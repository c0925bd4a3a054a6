"""One metrics endpoint for a node of several serving processes.

Each serving process keeps its own registry and serves it on a private loopback port;
the supervisor serves `metrics.listen_address` and, on each scrape, reads every serving
process's metrics and merges them, so one scrape shows the whole node:

- counters, histograms and summaries are summed (same name and labels);
- gauges that count things held per process (open streams, queued audit rows) are
  summed; gauges that are timestamps or "is it up" flags take the minimum (the worst
  process shows); every other gauge (states, heads, lags) takes the maximum;
- `tessera_serving_processes{state}` says how many answered the scrape (up) or not (down).

This was chosen over prometheus_client's multiprocess mode, which drops the gauges read
at scrape time (`set_function`) and custom collectors that the node relies on.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from tessera.core.errors import ConfigError
from tessera.core.net import split_host_port

log = logging.getLogger(__name__)

#: Gauges that are per-process amounts: the node's value is the sum.
SUMMED_GAUGES = frozenset({
    "tessera_event_streams", "tessera_audit_queue_rows",
})
#: Gauges where the worst process is the node's value: the smallest.
MIN_GAUGES = frozenset({
    "tessera_certificate_expiry_timestamp_seconds",
    "tessera_peer_certificate_expiry_timestamp_seconds",
    "tessera_event_listener_up",
})
#: Seconds a serving process gets to answer the supervisor's scrape.
SCRAPE_TIMEOUT_S = 2.0


def merge(texts: Iterable[str]) -> list[Metric]:
    """Merge several processes' text expositions into one set of families."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                values[fam.name] = {}
            merged = values[fam.name]
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                old = merged.get(key)
                if old is None:
                    merged[key] = s.value
                elif s.name.endswith("_created") or (
                        fam.type == "gauge" and fam.name in MIN_GAUGES):
                    merged[key] = min(old, s.value)
                elif fam.type == "gauge" and fam.name not in SUMMED_GAUGES:
                    merged[key] = max(old, s.value)
                else:
                    merged[key] = old + s.value
    for name, fam in families.items():
        for (sample, labels), value in values[name].items():
            fam.add_sample(sample, dict(labels), value)
    return list(families.values())


class ServingMetrics(Collector):
    """Collects the merged metrics of the serving processes whose ports `ports` lists."""

    def __init__(self, ports: Callable[[], list[int]]) -> None:
        self._ports = ports

    def collect(self) -> Iterator[Metric]:
        texts: list[str] = []
        down = 0
        for port in self._ports():
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_TIMEOUT_S) as r:
                    texts.append(r.read().decode())
            except OSError as exc:
                down += 1
                log.debug("serving process metrics on port %d: %s", port, exc)
        yield from merge(texts)
        family = GaugeMetricFamily(
            "tessera_serving_processes",
            "Serving processes whose metrics this scrape includes (up) or missed (down).",
            labels=["state"])
        family.add_metric(["up"], float(len(texts)))
        family.add_metric(["down"], float(down))
        yield family


def start_node_metrics(address: str, ports: Callable[[], list[int]]) -> WSGIServer:
    """Serve the merged metrics on `address` (host:port); the caller shuts it down."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServingMetrics(ports))
    host, port = split_host_port(address)
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"metrics.listen_address: cannot bind {address} ({exc.strerror}); "
                          "choose a free port") from None
    return server
