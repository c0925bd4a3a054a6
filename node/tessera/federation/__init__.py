"""Federated fan-out: calling peers with deadlines, breakers and an offline cache."""

from tessera.federation._breaker import BreakerState, CircuitBreaker
from tessera.federation._fanout import (
    FORWARD_TIMEOUT_S,
    Federation,
    SourceAnswer,
    load_peers,
)
from tessera.federation._follow import Followers, backoff_s, describe, received_of
from tessera.federation._merge import merge_sorted

__all__ = [
    "FORWARD_TIMEOUT_S",
    "BreakerState",
    "CircuitBreaker",
    "Federation",
    "Followers",
    "SourceAnswer",
    "backoff_s",
    "describe",
    "load_peers",
    "merge_sorted",
    "received_of",
]
