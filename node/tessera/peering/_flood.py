"""Enrolment attempts whose token does not verify: counted per source and in total.

The enrolment listener takes connections from anyone. An attempt whose token does not
verify (missing, malformed, or not MACed by this node) costs the node a TLS handshake and,
before this guard, a durable audit row each. Such attempts are now limited by two token
buckets, one per source network (/32 for IPv4, /64 for IPv6) and one for all sources, and
are audited in aggregate. Pure arithmetic over a clock passed in: no I/O.
"""

from __future__ import annotations

import ipaddress
import math
import urllib.parse
from dataclasses import dataclass

from tessera.core.net import host_of

#: Most source buckets kept; beyond it, full (idle) buckets are dropped first.
MAX_SOURCES = 65_536


def source_of(peer: str) -> str:
    """The source network of a gRPC peer string: 'ipv4:1.2.3.4:5' -> '1.2.3.4/32',
    'ipv6:[2001:db8::1]:5' -> '2001:db8::/64'; anything else (unix sockets) as is.

    grpcio percent-encodes the address ('ipv6:%5B::1%5D:5'): read literally, each
    connection (each client port) would be a source of its own.
    """
    kind, _, rest = peer.partition(":")
    host = ""
    if kind in ("ipv4", "ipv6"):
        host = host_of(urllib.parse.unquote(rest)).strip("[]")
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return peer or "unknown"
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 32 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass(frozen=True)
class Rate:
    """Attempts per second, and how many may come at once."""

    per_s: float
    burst: int


class FloodGuard:
    """Token buckets per source and for all sources; `take` says how long to wait."""

    def __init__(self, per_source: Rate, overall: Rate, *,
                 max_sources: int = MAX_SOURCES) -> None:
        self.per_source = per_source
        self.overall = overall
        self.max_sources = max_sources
        self._sources: dict[str, _Bucket] = {}
        self._all: _Bucket | None = None
        #: Shared by the sources that find the table full.
        self._overflow: _Bucket | None = None
        self._evicted_at = -math.inf

    @staticmethod
    def _level(b: _Bucket, rate: Rate, now: float) -> float:
        return min(float(rate.burst), b.tokens + max(0.0, now - b.updated) * rate.per_s)

    @staticmethod
    def _wait(level: float, rate: Rate) -> float:
        return math.inf if rate.per_s <= 0 else (1.0 - level) / rate.per_s

    def take(self, source: str, now: float) -> float:
        """Count one attempt from `source`: 0.0 if allowed, else seconds until it would be."""
        mine = self._sources.get(source)
        if mine is None:
            if len(self._sources) >= self.max_sources and now - self._evicted_at >= 1.0:
                self._evicted_at = now  # a full scan at most once a second
                self._evict(now)
            if len(self._sources) < self.max_sources:
                mine = self._sources[source] = _Bucket(float(self.per_source.burst), now)
            else:
                # No room: every new source shares one bucket. A fresh bucket each time
                # (unkept) gave a full burst per attempt once the table was full.
                if self._overflow is None:
                    self._overflow = _Bucket(float(self.per_source.burst), now)
                mine = self._overflow
        if self._all is None:
            self._all = _Bucket(float(self.overall.burst), now)
        own = self._level(mine, self.per_source, now)
        total = self._level(self._all, self.overall, now)
        mine.tokens, mine.updated = own, now
        self._all.tokens, self._all.updated = total, now
        if own < 1.0 or total < 1.0:
            # A refused attempt takes nothing: waiting out the answer is enough.
            wait = max(self._wait(own, self.per_source) if own < 1.0 else 0.0,
                       self._wait(total, self.overall) if total < 1.0 else 0.0)
            return max(wait, 0.001)
        mine.tokens -= 1.0
        self._all.tokens -= 1.0
        return 0.0

    def _evict(self, now: float) -> None:
        """Drop sources whose buckets have refilled: they are as good as new."""
        for key in [k for k, b in self._sources.items()
                    if self._level(b, self.per_source, now) >= self.per_source.burst]:
            del self._sources[key]

    def __len__(self) -> int:
        return len(self._sources)
