"""Resources and their events (transactional outbox) in PostgreSQL."""

from __future__ import annotations

import json
import struct
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import psycopg
from opentelemetry.trace import SpanKind
from pgvector import Vector
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from tessera.core.errors import FailedPrecondition, NotFound, PermissionDenied
from tessera.observability import traced
from tessera.store._events import NewEvent, append_events
from tessera.store._predicate import Predicate

Pool = AsyncConnectionPool[psycopg.AsyncConnection[Any]]


@dataclass(frozen=True)
class ResourceKey:
    """(workspace, kind, id)."""

    workspace: str
    kind: str
    id: str


@dataclass(frozen=True)
class Resource:
    """A stored resource."""

    workspace: str
    kind: str
    id: str
    title: str = ""
    body: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    #: A list, or `array('f')` as read from PostgreSQL (float32 values, no float objects):
    #: an array is not equal to a list of the same values, nor JSON-encodable; a resource
    #: read from the store goes out through `fill_resource` only.
    embedding: Sequence[float] | None = None
    owner: str = ""
    team: str = ""
    version: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def key(self) -> ResourceKey:
        """The resource's key."""
        return ResourceKey(self.workspace, self.kind, self.id)

    @property
    def etag(self) -> str:
        """Opaque entity tag of this version."""
        return etag_of(self.version)

    def as_json(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot (embedding left out), for operation results."""
        return {
            "workspace": self.workspace, "kind": self.kind, "id": self.id, "title": self.title,
            "body": self.body, "attributes": self.attributes, "owner": self.owner,
            "team": self.team, "version": self.version,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Resource:
        """Inverse of as_json."""
        return cls(
            workspace=data["workspace"], kind=data["kind"], id=data["id"], title=data["title"],
            body=data["body"], attributes=data["attributes"], owner=data["owner"],
            team=data["team"], version=data["version"],
            created_at=datetime.fromisoformat(data["created_at"]) if data["created_at"] else None,
            updated_at=datetime.fromisoformat(data["updated_at"]) if data["updated_at"] else None,
        )


def etag_of(version: int) -> str:
    """The etag of a version."""
    return f"v{version}"


def version_of_etag(etag: str) -> int | None:
    """The version an etag names, or None if it is not one of ours."""
    if len(etag) > 1 and etag[0] == "v" and etag[1:].isdigit():
        return int(etag[1:])
    return None


@dataclass(frozen=True)
class ListQuery:
    """Filters and position of a list call, already validated."""

    workspace: str = ""
    kind: str = ""
    team: str = ""
    owner: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    updated_since: datetime | None = None
    order: Literal["key", "updated_desc"] = "key"
    limit: int = 100
    after: Sequence[Any] | None = None


_COLUMNS = sql.SQL(
    "workspace, kind, id, title, body, attributes, embedding,"
    " owner, team, version, created_at, updated_at"
)
#: The same columns without the embedding, for answers that do not return it.
_COLUMNS_NO_EMBEDDING = sql.SQL(
    "workspace, kind, id, title, body, attributes, NULL::vector AS embedding,"
    " owner, team, version, created_at, updated_at"
)
#: GetResource's statement for an unscoped caller, composed once: the SQL text is then the
#: same bytes on every call, which psycopg prepares on each connection after a few uses.
_GET_SQL = sql.SQL(
    "SELECT {} FROM resources WHERE workspace = %s AND kind = %s AND id = %s"
).format(_COLUMNS)
#: The same as text (a composed statement is rendered again on every execute, ≈ 2 µs).
_GET_TEXT = _GET_SQL.as_string()


def _scoped(
    where: sql.Composable, params: Sequence[Any], scope: Predicate | None
) -> tuple[sql.Composable, tuple[Any, ...]]:
    """`where AND scope`, with the parameters in order."""
    if scope is None:
        return where, tuple(params)
    return where + sql.SQL(" AND ") + scope.condition, (*params, *scope.params)


def resource_filters(scope: Predicate | None, *, workspace: str = "", kind: str = "",
                     team: str = "", owner: str = "", attributes: dict[str, Any] | None = None,
                     updated_since: datetime | None = None,
                     ) -> tuple[list[sql.Composable], list[Any]]:
    """The conditions (to AND together) and their parameters that select resources inside
    `scope` by the filters List and Search share; an empty filter selects everything."""
    where: list[sql.Composable] = []
    params: list[Any] = []
    for column, value in (("workspace", workspace), ("kind", kind), ("team", team),
                          ("owner", owner)):
        if value:
            where.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
            params.append(value)
    if attributes:
        where.append(sql.SQL("attributes @> %s::jsonb"))
        params.append(json.dumps(attributes))
    if updated_since is not None:
        where.append(sql.SQL("updated_at >= %s"))
        params.append(updated_since)
    if scope is not None:  # last: search's cached statements put its parameters last
        where.append(scope.condition)
        params.extend(scope.params)
    return where, params


def _existing_row_inside(scope: Predicate | None) -> sql.Composable:
    """The scope, evaluated on the existing row of an ON CONFLICT DO UPDATE.

    There both `resources` and `EXCLUDED` are visible, so the scope's unqualified column
    names are bound to the existing row through a one-row derived table.
    """
    if scope is None:
        return sql.SQL("TRUE")
    return sql.SQL(
        "(SELECT {} FROM (VALUES (resources.workspace, resources.kind, resources.team,"
        " resources.owner)) AS existing(workspace, kind, team, owner))"
    ).format(scope.condition)


def vector_from_binary(data: bytes | memoryview) -> array[float]:
    """pgvector's binary form (vector_send): uint16 dimension, uint16 unused, big-endian
    float4 each; as `array('f')`, with no Python float per value."""
    dim, unused = _VECTOR_HEADER.unpack_from(data)
    if unused != 0 or len(data) != 4 + 4 * dim:
        raise ValueError("not pgvector's binary form of a vector")
    out = array("f")
    out.frombytes(memoryview(data)[4:])
    if sys.byteorder == "little":
        out.byteswap()
    return out


def embedding_of(value: Any) -> Sequence[float] | None:
    """A `vector` column's value as float32 values.

    Results are read in binary, where the loader `open_pool` registers on every pooled
    connection gives an `array('f')`; a `Vector`, raw bytes or text only come from a
    connection without it.
    """
    if value is None:
        return None
    if isinstance(value, array):
        return value
    if isinstance(value, Vector):
        return value.to_list()
    if isinstance(value, bytes | memoryview):
        return vector_from_binary(value)
    return Vector.from_text(str(value)).to_list()


_VECTOR_HEADER = struct.Struct(">HH")


class PackedVector:
    """An embedding held as float32 values (`array('f')`), sent in pgvector's binary form.

    A query vector arrives as a protobuf `repeated float`; copied into an `array('f')` by
    the C runtime it never becomes one Python float per value, as a list for pgvector's
    `Vector` would (`list()` then `array('f', list)`: ≈ 11 µs for 384 values). Dumped by
    the adapters `open_pool` registers.
    """

    __slots__ = ("values",)

    def __init__(self, values: array[float]) -> None:
        if values.typecode != "f":
            raise ValueError(f"expected array('f'), got array({values.typecode!r})")
        self.values = values

    def to_binary(self) -> bytes:
        """vector_recv's layout: uint16 dimension, uint16 unused, big-endian float4 each."""
        values = self.values
        if sys.byteorder == "little":
            values = array("f", values)  # a copy (C level): the caller's stays as it is
            values.byteswap()
        return _VECTOR_HEADER.pack(len(values), 0) + values.tobytes()

    def to_text(self) -> str:
        """pgvector's text form (for a text-format parameter)."""
        return vector_literal(self.values)


def to_vector(values: Sequence[float]) -> Vector | PackedVector:
    """An embedding as a parameter: sent in pgvector's binary form (`%b`), no text."""
    if isinstance(values, array) and values.typecode == "f":
        return PackedVector(values)
    return Vector(values if isinstance(values, list) else list(values))


def _row_to_resource(row: dict[str, Any]) -> Resource:
    return Resource(
        workspace=row["workspace"], kind=row["kind"], id=row["id"], title=row["title"],
        body=row["body"], attributes=row["attributes"],
        embedding=embedding_of(row["embedding"]),
        owner=row["owner"], team=row["team"], version=row["version"],
        created_at=row["created_at"], updated_at=row["updated_at"],
    )


def vector_literal(values: Sequence[float]) -> str:
    """pgvector's text form of a vector (for tools and SQL shells; the node sends binary)."""
    return "[" + ",".join(repr(float(v)) for v in values) + "]"


#: Attributes of the store's spans.
_DB = {"db.system": "postgresql"}


class ResourceStore:
    """Reads and writes resources; every write appends its event in the same transaction."""

    def __init__(self, pool: Pool, *, origin: str = "") -> None:
        self.pool = pool
        #: The node name recorded as the origin of resource events.
        self.origin = origin

    @traced("store get", SpanKind.CLIENT, **_DB)
    async def get(self, key: ResourceKey, scope: Predicate | None = None) -> Resource:
        """One resource; NotFound if absent or outside `scope` (indistinguishably)."""
        query: sql.Composable | str
        if scope is None:
            query, params = _GET_TEXT, (key.workspace, key.kind, key.id)
        else:
            where, params = _scoped(
                sql.SQL("workspace = %s AND kind = %s AND id = %s"),
                (key.workspace, key.kind, key.id), scope)
            query = sql.SQL("SELECT {} FROM resources WHERE {}").format(_COLUMNS, where)
        async with self.pool.connection() as conn:
            # Binary results: the embedding arrives in pgvector's binary form.
            cur = await conn.execute(query, params, binary=True)
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"resource {key.workspace}/{key.kind}/{key.id} does not exist")
        return _row_to_resource(row)

    @traced("store count", SpanKind.CLIENT, **_DB)
    async def count_by_kind(self, scope: Predicate) -> dict[str, int]:
        """How many resources are inside `scope`, by kind (kinds with none left out)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                sql.SQL("SELECT kind, count(*) AS n FROM resources WHERE {} GROUP BY kind")
                .format(scope.condition), tuple(scope.params))
            return {str(r["kind"]): int(r["n"]) for r in await cur.fetchall()}

    @traced("store list", SpanKind.CLIENT, **_DB)
    async def list(self, q: ListQuery, scope: Predicate | None = None) -> list[Resource]:
        """Up to q.limit resources after q.after, in the query's order, inside `scope`."""
        where, params = resource_filters(
            scope, workspace=q.workspace, kind=q.kind, team=q.team, owner=q.owner,
            attributes=q.attributes, updated_since=q.updated_since)
        if q.order == "key":
            order = sql.SQL("workspace, kind, id")
            if q.after is not None:
                where.append(sql.SQL("(workspace, kind, id) > (%s, %s, %s)"))
                params.extend(q.after)
        else:
            order = sql.SQL("updated_at DESC, workspace DESC, kind DESC, id DESC")
            if q.after is not None:
                where.append(sql.SQL(
                    "(updated_at, workspace, kind, id) < (%s::timestamptz, %s, %s, %s)"
                ))
                params.extend(q.after)
        query = sql.SQL("SELECT {cols} FROM resources {where} ORDER BY {order} LIMIT %s").format(
            cols=_COLUMNS,
            where=sql.SQL("WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""),
            order=order,
        )
        params.append(q.limit)
        async with self.pool.connection() as conn:
            cur = await conn.execute(query, params, binary=True)
            rows = await cur.fetchall()
        return [_row_to_resource(r) for r in rows]

    # -- effects of built-in commands, applied inside the Execute transaction ----------

    @traced("store put", SpanKind.CLIENT, **_DB)
    async def apply_put(
        self, conn: psycopg.AsyncConnection[Any], r: Resource, expected: int | None,
        create_only: bool, scope: Predicate | None = None,
    ) -> Resource:
        """Create or replace `r`; raises FailedPrecondition / PermissionDenied."""
        values = (r.workspace, r.kind, r.id, r.title, r.body, json.dumps(r.attributes),
                  to_vector(r.embedding) if r.embedding else None, r.owner, r.team)
        insert = sql.SQL(
            "INSERT INTO resources (workspace, kind, id, title, body, attributes, embedding,"
            " owner, team) VALUES (%s, %s, %s, %s, %s, %s::jsonb, %b::vector, %s, %s)"
        )
        if create_only:
            cur = await conn.execute(
                insert + sql.SQL(" ON CONFLICT DO NOTHING RETURNING {}").format(_COLUMNS), values,
                binary=True,
            )
            row = await cur.fetchone()
            if row is None:
                raise FailedPrecondition(
                    f"resource {r.workspace}/{r.kind}/{r.id} already exists",
                    reason="ALREADY_EXISTS",
                )
        elif expected is not None:
            cur = await conn.execute(
                sql.SQL(
                    "UPDATE resources SET title = %s, body = %s, attributes = %s::jsonb,"
                    " embedding = %b::vector, owner = %s, team = %s, version = version + 1,"
                    " updated_at = now() WHERE workspace = %s AND kind = %s AND id = %s"
                    " AND version = %s AND {} RETURNING {}"
                ).format(scope.condition if scope else sql.SQL("TRUE"), _COLUMNS),
                (*values[3:], r.workspace, r.kind, r.id, expected,
                 *(scope.params if scope else ())),
                binary=True,
            )
            row = await cur.fetchone()
            if row is None:
                raise FailedPrecondition(
                    f"resource {r.workspace}/{r.kind}/{r.id} is not at version "
                    f"{etag_of(expected)}; read it again and retry",
                    reason="ETAG_MISMATCH",
                )
        else:
            cur = await conn.execute(
                insert + sql.SQL(
                    " ON CONFLICT (workspace, kind, id) DO UPDATE SET title = EXCLUDED.title,"
                    " body = EXCLUDED.body, attributes = EXCLUDED.attributes,"
                    " embedding = EXCLUDED.embedding, owner = EXCLUDED.owner,"
                    " team = EXCLUDED.team, version = resources.version + 1, updated_at = now()"
                    " WHERE {} RETURNING {}"
                ).format(_existing_row_inside(scope), _COLUMNS),
                (*values, *(scope.params if scope else ())),
                binary=True,
            )
            row = await cur.fetchone()
            if row is None:
                # Only a scoped write skips the update: the row exists outside the scope.
                # The key is in a granted kind and workspace, so this tells the caller no
                # more than that the key is taken.
                raise PermissionDenied(
                    f"resource {r.workspace}/{r.kind}/{r.id} exists outside the grant's scope",
                    reason="RESOURCE_OUT_OF_SCOPE",
                )
        assert row is not None
        return _row_to_resource(row)

    @traced("store delete", SpanKind.CLIENT, **_DB)
    async def apply_delete(
        self, conn: psycopg.AsyncConnection[Any], key: ResourceKey, expected: int | None,
        allow_missing: bool, scope: Predicate | None = None,
    ) -> Resource | None:
        """Delete `key`; the removed row, or None when allowed to be missing."""
        where, params = _scoped(
            sql.SQL("workspace = %s AND kind = %s AND id = %s"),
            (key.workspace, key.kind, key.id), scope)
        cur = await conn.execute(
            sql.SQL(
                "DELETE FROM resources WHERE {} AND (%s::bigint IS NULL OR version = %s::bigint)"
                " RETURNING {}"
            ).format(where, _COLUMNS),
            (*params, expected, expected),
            binary=True,
        )
        row = await cur.fetchone()
        if row is not None:
            return _row_to_resource(row)
        # Rows outside the scope answer exactly as missing ones do.
        cur = await conn.execute(
            sql.SQL("SELECT version FROM resources WHERE {}").format(where), params
        )
        if await cur.fetchone() is not None:
            raise FailedPrecondition(
                f"resource {key.workspace}/{key.kind}/{key.id} is not at version "
                f"{etag_of(expected or 0)}; read it again and retry",
                reason="ETAG_MISMATCH",
            )
        if not allow_missing:
            raise NotFound(f"resource {key.workspace}/{key.kind}/{key.id} does not exist")
        return None


async def append_event(
    conn: psycopg.AsyncConnection[Any], event_type: str, key: ResourceKey | None,
    data: dict[str, Any], actor: str, *, team: str | None = None, owner: str | None = None,
    origin: str = "",
) -> int:
    """Append one event inside the caller's transaction; returns its sequence.

    Team and owner None are taken from the subject's row, if there is one (see
    `store._events.append_events`, which also keeps sequence order = commit order).
    """
    stored = await append_events(conn, [NewEvent(
        type=event_type, workspace=key.workspace if key else "", kind=key.kind if key else "",
        resource_id=key.id if key else "", data=data, team=team, owner=owner,
    )], actor=actor, origin=origin)
    return stored[0].sequence

