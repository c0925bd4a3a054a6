"""PostgreSQL + pgvector storage: pool, migrations, resources, events, operations."""

from tessera.store._db import migrate, migrations, open_pool, redact_dsn, schema_version
from tessera.store._effects import (
    AuditIntent,
    audit_intent,
    bind_audit_intent,
    effect_transaction,
    write_pending_audit,
)
from tessera.store._events import (
    EVENTS_CHANNEL,
    EventStore,
    LogState,
    NewEvent,
    Page,
    StoredEvent,
    Subscription,
    append_events,
)
from tessera.store._follows import (
    Follow,
    FollowStopped,
    FollowStore,
    ReceivedEvent,
    store_received,
)
from tessera.store._health import STORE_UNAVAILABLE, StoreHealth, unavailable
from tessera.store._lease import LEASE_APP, Lease
from tessera.store._operations import (
    DONE_STATES,
    OPERATION_EVENT_KIND,
    OPERATIONS_CHANNEL,
    Effect,
    Operation,
    OperationError,
    OperationStore,
    operation_uuid,
)
from tessera.store._predicate import NOTHING, Predicate, any_of
from tessera.store._reload import ReloadChannel
from tessera.store._resources import (
    ListQuery,
    Pool,
    Resource,
    ResourceKey,
    ResourceStore,
    append_event,
    etag_of,
    vector_literal,
    version_of_etag,
)
from tessera.store._search import Metric, SearchQuery, search, search_statement
from tessera.store._tier import TableCopy, TierCopy, copy_database

__all__ = [
    "DONE_STATES",
    "EVENTS_CHANNEL",
    "LEASE_APP",
    "NOTHING",
    "OPERATIONS_CHANNEL",
    "OPERATION_EVENT_KIND",
    "STORE_UNAVAILABLE",
    "AuditIntent",
    "Effect",
    "EventStore",
    "Follow",
    "FollowStopped",
    "FollowStore",
    "Lease",
    "ListQuery",
    "LogState",
    "Metric",
    "NewEvent",
    "Operation",
    "OperationError",
    "OperationStore",
    "Page",
    "Pool",
    "Predicate",
    "ReceivedEvent",
    "ReloadChannel",
    "Resource",
    "ResourceKey",
    "ResourceStore",
    "SearchQuery",
    "StoreHealth",
    "StoredEvent",
    "Subscription",
    "TableCopy",
    "TierCopy",
    "any_of",
    "append_event",
    "append_events",
    "audit_intent",
    "bind_audit_intent",
    "copy_database",
    "effect_transaction",
    "etag_of",
    "migrate",
    "migrations",
    "open_pool",
    "operation_uuid",
    "redact_dsn",
    "schema_version",
    "search",
    "search_statement",
    "store_received",
    "unavailable",
    "vector_literal",
    "version_of_etag",
    "write_pending_audit",
]
