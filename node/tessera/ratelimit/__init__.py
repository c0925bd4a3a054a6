"""Rate limiting: GCRA per grant (or local identity) and method class, decided in Valkey.

`RateLimiter` is the call path's `Limiter`; `gcra` is the pure arithmetic it and the Lua
script share.
"""

from tessera.config import METHOD_CLASSES, Limit, parse_limits
from tessera.ratelimit._budget import LocalBudgets, Reservation, RowBudgets
from tessera.ratelimit._gcra import Decision, gcra
from tessera.ratelimit._limiter import (
    DEFAULT_LOCAL,
    DEFAULT_PEER,
    ClassStatus,
    LimitStatus,
    LocalGcra,
    RateLimiter,
    share_of,
)
from tessera.ratelimit._policy import effective_limit, grant_limit, method_class, subject_of

__all__ = [
    "DEFAULT_LOCAL",
    "DEFAULT_PEER",
    "METHOD_CLASSES",
    "ClassStatus",
    "Decision",
    "Limit",
    "LimitStatus",
    "LocalBudgets",
    "LocalGcra",
    "RateLimiter",
    "Reservation",
    "RowBudgets",
    "effective_limit",
    "gcra",
    "grant_limit",
    "method_class",
    "parse_limits",
    "share_of",
    "subject_of",
]
