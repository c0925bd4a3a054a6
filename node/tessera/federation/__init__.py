"""Federated fan-out: calling peers with deadlines, breakers and an offline cache."""

from tessera.federation._breaker import BreakerState, CircuitBreaker
from tessera.federation._fanout import (
    Federation,
    SourceAnswer,
    load_peers,
)

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "Federation",
    "SourceAnswer",
    "load_peers",
]
