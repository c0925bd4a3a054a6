"""Connection pool and versioned migrations."""

from __future__ import annotations

import logging
import math
import re
from array import array
from importlib import resources as pkg_resources
from typing import Any

import psycopg
from pgvector.psycopg.vector import register_vector_info
from psycopg.abc import Buffer
from psycopg.adapt import Dumper, Loader
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import Format
from psycopg.rows import dict_row
from psycopg.types import TypeInfo
from psycopg_pool import AsyncConnectionPool

from tessera.config import StoreConfig
from tessera.core.errors import ConfigError, Unavailable
from tessera.core.redact import redact_url
from tessera.store._resources import PackedVector, vector_from_binary
from tessera.store._search import DEFAULT_EF_SEARCH

log = logging.getLogger(__name__)

_OPCLASS = {"cosine": "vector_cosine_ops", "l2": "vector_l2_ops", "inner_product": "vector_ip_ops"}
_MIGRATION_RE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# Serialises migrations across replicas that start at once.
_MIGRATION_LOCK = 0x7E55E7A0


def redact_dsn(dsn: str) -> str:
    """The DSN with any password removed, for messages and `doctor`."""
    if "://" in dsn:
        return redact_url(dsn, secret_query=lambda name: name == "password")
    # key=value form: parse it as libpq does, so quoted passwords with spaces are caught.
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparseable DSN>"
    return " ".join(f"{k}=***" if k == "password" else f"{k}={v}" for k, v in params.items())


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every bundled migration, in order."""
    found = []
    folder = pkg_resources.files("tessera.store") / "migrations"
    for entry in folder.iterdir():
        m = _MIGRATION_RE.match(entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text()))
    return sorted(found)


async def open_pool(
    cfg: StoreConfig, dsn: str
) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
    """Open the pool and check one connection works; raises Unavailable with a safe message."""
    timeout_ms = int(cfg.statement_timeout_s * 1000)
    vector = _VectorType()
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
        dsn,
        min_size=cfg.pool_min,
        max_size=cfg.pool_max,
        configure=vector.configure,
        kwargs={
            "row_factory": dict_row,
            # Search defaults (pgvector GUCs, accepted as placeholders until the
            # extension loads): relaxed-order iterative scans keep filtered searches
            # returning k rows, and most searches then need no per-query SET.
            "options": f"-c statement_timeout={timeout_ms} -c hnsw.ef_search={DEFAULT_EF_SEARCH}"
                       " -c hnsw.iterative_scan=relaxed_order",
            "autocommit": True,
            # A host that does not answer at all fails a connection attempt this fast.
            "connect_timeout": max(2, math.ceil(cfg.unavailable_after_s)),
        },
        open=False,
        # A call waits this long for a connection, then answers UNAVAILABLE.
        timeout=cfg.unavailable_after_s,
        # Reconnection backs off exponentially; ending each round of attempts after 10 s
        # (the next call starts a new one) keeps the wait after PostgreSQL returns short,
        # instead of up to half the outage.
        reconnect_timeout=10.0,
        name="tessera",
    )
    try:
        await pool.open(wait=True, timeout=15.0)
    except Exception as exc:
        await pool.close()
        raise Unavailable(
            f"cannot connect to PostgreSQL at {redact_dsn(dsn)}: {type(exc).__name__}; "
            "check store.dsn and that the server is up"
        ) from None
    return pool


class _VectorType:
    """Registers pgvector's psycopg adapter on each new connection of one pool.

    Embeddings then travel in pgvector's binary form both ways (`Vector` parameters are
    dumped with `vector_recv`'s layout, `vector` columns in binary results load as
    `Vector`), with no text literal built or parsed. The type's oid is looked up once per
    pool; on a fresh database the extension appears only with migration 0001, so until
    then connections stay unregistered and `migrate` replaces them afterwards.
    """

    def __init__(self) -> None:
        self.info: TypeInfo | None = None

    async def configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        info = self.info
        if info is None:
            info = await TypeInfo.fetch(conn, "vector")
            if info is None:
                return
            self.info = info
        register_vector_info(conn, info)
        register_packed_vector(conn, info.oid)


class _PackedTextDumper(Dumper):
    format = Format.TEXT

    def dump(self, obj: PackedVector) -> Buffer:
        return obj.to_text().encode()


class _PackedBinaryDumper(Dumper):
    format = Format.BINARY

    def dump(self, obj: PackedVector) -> Buffer:
        return obj.to_binary()


class _PackedBinaryLoader(Loader):
    format = Format.BINARY

    def load(self, data: Buffer) -> array[float]:
        return vector_from_binary(data if isinstance(data, bytes) else memoryview(data))


def register_packed_vector(conn: psycopg.AsyncConnection[Any], oid: int) -> None:
    """Let `conn` send `PackedVector` parameters as the `vector` type (oid `oid`), and read
    binary `vector` results as `array('f')` (pgvector's loader makes a `Vector`, whose
    `to_list()` then costs a Python float per value)."""
    adapters = conn.adapters
    adapters.register_loader(oid, _PackedBinaryLoader)
    adapters.register_dumper(PackedVector, type("", (_PackedTextDumper,), {"oid": oid}))
    adapters.register_dumper(PackedVector, type("", (_PackedBinaryDumper,), {"oid": oid}))


async def migrate(
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]], cfg: StoreConfig
) -> int:
    """Apply pending migrations; returns the schema version. Idempotent and replica-safe."""
    before, after = await _migrate(pool, cfg)
    if before == 0:
        # The vector type may have been created just now: connections opened before it
        # have no adapter for it, so the pool replaces them.
        await pool.drain()
    return after


async def _migrate(
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]], cfg: StoreConfig
) -> tuple[int, int]:
    """Apply pending migrations; returns the schema version before and after them."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur = await conn.execute("SELECT coalesce(max(version), 0) AS v FROM schema_migrations")
        row = await cur.fetchone()
        current = before = int(row["v"]) if row else 0
        params = {"dimension": cfg.embedding_dimension, "opclass": _OPCLASS[cfg.metric]}
        for version, name, text in migrations():
            if version <= current:
                continue
            log.info("applying migration %s", name)
            try:
                await conn.execute(text.format(**params).encode())
            except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
                # lock_timeout (another session holds what the migration changes) or
                # statement_timeout: the whole run rolls back, and the next start retries.
                raise Unavailable(
                    f"migration {name} timed out ({exc.sqlstate}: waiting for a lock another "
                    "session holds, or running past store.statement_timeout_s); nothing was "
                    "applied, start again once that session has finished"
                ) from None
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name)
            )
            current = version
        await _check_meta(conn, "embedding_dimension", str(cfg.embedding_dimension),
                          "store.embedding_dimension")
        await _check_meta(conn, "metric", cfg.metric, "store.metric")
    return before, current


async def _check_meta(
    conn: psycopg.AsyncConnection[Any], key: str, want: str, setting: str
) -> None:
    """Record a schema-shaping setting once; refuse a later start that disagrees."""
    cur = await conn.execute(
        "INSERT INTO node_meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING"
        " RETURNING value",
        (key, want),
    )
    if await cur.fetchone() is not None:
        return
    cur = await conn.execute("SELECT value FROM node_meta WHERE key = %s", (key,))
    row = await cur.fetchone()
    have = row["value"] if row else want
    if have != want:
        raise ConfigError(
            f"{setting}: the database was created with {have}, the configuration says {want}; "
            f"set {setting} = {have} (changing it needs a new database)"
        )


async def schema_version(pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]]) -> int:
    """The applied schema version (0 when none)."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT coalesce(max(version), 0) AS v FROM schema_migrations"
        )
        row = await cur.fetchone()
    return int(row["v"]) if row else 0
