"""Federated fan-out: calling peers with deadlines, breakers and an offline cache."""

from tessera.federation._breaker import BreakerState, CircuitBreaker
from tessera.federation._fanout import (
    Federation,
    SourceAnswer,
    load_peers,
)
from tessera.federation._merge import merge_sorted

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "Federation",
    "SourceAnswer",
    "load_peers",
    "merge_sorted",
]
