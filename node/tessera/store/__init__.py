"""PostgreSQL + pgvector storage: pool, migrations, resources, events, operations."""

from tessera.store._db import migrate, migrations, open_pool, redact_dsn, schema_version
from tessera.store._predicate import NOTHING, Predicate
from tessera.store._resources import (
    EVENTS_CHANNEL,
    ListQuery,
    Operation,
    Pool,
    Resource,
    ResourceKey,
    ResourceStore,
    append_event,
    etag_of,
    vector_literal,
    version_of_etag,
)
from tessera.store._search import Metric, SearchQuery, search

__all__ = [
    "EVENTS_CHANNEL",
    "NOTHING",
    "ListQuery",
    "Metric",
    "Operation",
    "Pool",
    "Predicate",
    "Resource",
    "ResourceKey",
    "ResourceStore",
    "SearchQuery",
    "append_event",
    "etag_of",
    "migrate",
    "migrations",
    "open_pool",
    "redact_dsn",
    "schema_version",
    "search",
    "vector_literal",
    "version_of_etag",
]
