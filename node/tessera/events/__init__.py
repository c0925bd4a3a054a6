"""The event log's service layer: publish, durable ordered streams scoped by grants, ack.

Pure parts (`_patterns`, `_cursor`) are plain functions; `EventHub` is the per-process
listener, lock holder and pruner; `EventService` is what the servicer calls.
"""

from tessera.events._cursor import Cursor, CursorError, decode, encode
from tessera.events._hub import EventHub, StreamHandle, lock_key
from tessera.events._patterns import (
    RESERVED_PREFIXES,
    like_of,
    matches,
    matches_any,
    pattern_problem,
    type_problem,
)
from tessera.events._service import (
    ANY_ORIGIN,
    LOCAL_ORIGIN,
    Delivery,
    EventService,
    Start,
    SubscribeParams,
)

__all__ = [
    "ANY_ORIGIN",
    "LOCAL_ORIGIN",
    "RESERVED_PREFIXES",
    "Cursor",
    "CursorError",
    "Delivery",
    "EventHub",
    "EventService",
    "Start",
    "StreamHandle",
    "SubscribeParams",
    "decode",
    "encode",
    "like_of",
    "lock_key",
    "matches",
    "matches_any",
    "pattern_problem",
    "type_problem",
]
