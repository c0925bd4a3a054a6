"""Resources, their events (transactional outbox) and idempotent operations in PostgreSQL."""

from __future__ import annotations

import builtins
import json
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from tessera.core.errors import FailedPrecondition, NotFound, PermissionDenied
from tessera.core.pagination import query_hash
from tessera.store._predicate import Predicate

Pool = AsyncConnectionPool[psycopg.AsyncConnection[Any]]
# Transaction-level lock taken by every event append: sequence order = commit order.
_EVENT_LOCK = 0x7E55E7A1
EVENTS_CHANNEL = "tessera_events"


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
    embedding: list[float] | None = None
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
class Operation:
    """A recorded command execution."""

    name: str
    caller: str
    idempotency_key: str
    command_type: str
    state: Literal["SUCCEEDED", "FAILED"]
    result: Resource | None
    not_found: bool
    event_sequence: int | None
    created_at: datetime
    updated_at: datetime


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
    "workspace, kind, id, title, body, attributes, vector_send(embedding) AS embedding,"
    " owner, team, version, created_at, updated_at"
)
#: The same columns without the embedding, for answers that do not return it.
_COLUMNS_NO_EMBEDDING = sql.SQL(
    "workspace, kind, id, title, body, attributes, NULL::bytea AS embedding,"
    " owner, team, version, created_at, updated_at"
)


def _scoped(
    where: sql.Composable, params: Sequence[Any], scope: Predicate | None
) -> tuple[sql.Composable, tuple[Any, ...]]:
    """`where AND scope`, with the parameters in order."""
    if scope is None:
        return where, tuple(params)
    return where + sql.SQL(" AND ") + scope.condition, (*params, *scope.params)


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


def vector_from_binary(data: bytes) -> list[float]:
    """pgvector's binary form (vector_send): uint16 dimension, uint16 unused, float4 each."""
    (dim,) = struct.unpack_from(">H", data)
    return list(struct.unpack_from(f">{dim}f", data, 4))


def _row_to_resource(row: dict[str, Any]) -> Resource:
    # Embeddings travel in pgvector's binary form: parsing 384 numbers from text cost
    # more than the rest of reading a row.
    emb = row["embedding"]
    return Resource(
        workspace=row["workspace"], kind=row["kind"], id=row["id"], title=row["title"],
        body=row["body"], attributes=row["attributes"],
        embedding=vector_from_binary(emb) if emb else None,
        owner=row["owner"], team=row["team"], version=row["version"],
        created_at=row["created_at"], updated_at=row["updated_at"],
    )


def vector_literal(values: Sequence[float]) -> str:
    """pgvector's text form of a vector."""
    return "[" + ",".join(repr(float(v)) for v in values) + "]"


class ResourceStore:
    """Reads and writes resources; every write appends its event in the same transaction."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def get(self, key: ResourceKey, scope: Predicate | None = None) -> Resource:
        """One resource; NotFound if absent or outside `scope` (indistinguishably)."""
        where, params = _scoped(
            sql.SQL("workspace = %s AND kind = %s AND id = %s"),
            (key.workspace, key.kind, key.id), scope)
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                sql.SQL("SELECT {} FROM resources WHERE {}").format(_COLUMNS, where), params
            )
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"resource {key.workspace}/{key.kind}/{key.id} does not exist")
        return _row_to_resource(row)

    async def list(self, q: ListQuery, scope: Predicate | None = None) -> list[Resource]:
        """Up to q.limit resources after q.after, in the query's order, inside `scope`."""
        where: list[sql.Composable] = []
        params: list[Any] = []
        if scope is not None:
            where.append(scope.condition)
            params.extend(scope.params)
        for column, value in (("workspace", q.workspace), ("kind", q.kind), ("team", q.team),
                              ("owner", q.owner)):
            if value:
                where.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
                params.append(value)
        if q.attributes:
            where.append(sql.SQL("attributes @> %s::jsonb"))
            params.append(json.dumps(q.attributes))
        if q.updated_since is not None:
            where.append(sql.SQL("updated_at >= %s"))
            params.append(q.updated_since)
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
            cur = await conn.execute(query, params)
            rows = await cur.fetchall()
        return [_row_to_resource(r) for r in rows]

    # -- commands ---------------------------------------------------------------------

    async def _existing_operation(
        self, conn: psycopg.AsyncConnection[Any], caller: str, key: str, req_hash: str
    ) -> Operation | None:
        cur = await conn.execute(
            "SELECT * FROM operations WHERE caller = %s AND idempotency_key = %s", (caller, key)
        )
        row = await cur.fetchone()
        if row is None:
            return None
        if row["request_hash"] != req_hash:
            raise FailedPrecondition(
                "idempotency_key was already used for a different request; use a new key",
                reason="IDEMPOTENCY_KEY_REUSED",
            )
        return _row_to_operation(row)

    async def execute_put(
        self,
        *,
        caller: str,
        idempotency_key: str,
        resource: Resource,
        expected_version: int | None,
        create_only: bool,
        scope: Predicate | None = None,
    ) -> Operation:
        """Create or replace a resource, once per idempotency key.

        With `scope`, an existing row is replaced only if it is inside the scope too.
        """
        payload = {"put": resource.as_json(), "embedding": resource.embedding,
                   "expected": expected_version, "create_only": create_only}
        return await self._execute(
            caller, idempotency_key, "resource.put", query_hash(payload),
            lambda conn: self._put(conn, resource, expected_version, create_only, scope),
        )

    async def execute_delete(
        self,
        *,
        caller: str,
        idempotency_key: str,
        key: ResourceKey,
        expected_version: int | None,
        allow_missing: bool,
        scope: Predicate | None = None,
    ) -> Operation:
        """Delete a resource, once per idempotency key; rows outside `scope` look absent."""
        payload = {"delete": [key.workspace, key.kind, key.id], "expected": expected_version,
                   "allow_missing": allow_missing}
        return await self._execute(
            caller, idempotency_key, "resource.delete", query_hash(payload),
            lambda conn: self._delete(conn, key, expected_version, allow_missing, scope),
        )

    async def _execute(
        self, caller: str, idem_key: str, command_type: str, req_hash: str, apply: Any
    ) -> Operation:
        for _attempt in range(2):
            try:
                async with self.pool.connection() as conn, conn.transaction():
                    existing = await self._existing_operation(conn, caller, idem_key, req_hash)
                    if existing is not None:
                        return existing
                    resource, not_found, event_type = await apply(conn)
                    sequence = None
                    if event_type is not None and resource is not None:
                        sequence = await append_event(
                            conn, event_type, resource.key,
                            {"version": resource.version, "etag": resource.etag}, caller,
                        )
                    cur = await conn.execute(
                        "INSERT INTO operations (name, caller, idempotency_key, request_hash,"
                        " command_type, state, result, event_sequence)"
                        " VALUES (%s, %s, %s, %s, %s, 'SUCCEEDED', %s::jsonb, %s) RETURNING *",
                        (uuid.uuid4(), caller, idem_key, req_hash, command_type,
                         json.dumps({"resource": resource.as_json() if resource else None,
                                     "not_found": not_found}),
                         sequence),
                    )
                    row = await cur.fetchone()
                    assert row is not None
                    return _row_to_operation(row)
            except psycopg.errors.UniqueViolation as exc:
                # A concurrent call with the same key committed first; our transaction (and
                # its write) rolled back. Loop once to return the winner's operation.
                if exc.diag.constraint_name != "operations_caller_idempotency_key_key":
                    raise
        raise FailedPrecondition("idempotency_key is being used concurrently; retry",
                                 reason="IDEMPOTENCY_CONFLICT")

    async def _put(
        self, conn: psycopg.AsyncConnection[Any], r: Resource, expected: int | None,
        create_only: bool, scope: Predicate | None = None,
    ) -> tuple[Resource, bool, str]:
        values = (r.workspace, r.kind, r.id, r.title, r.body, json.dumps(r.attributes),
                  vector_literal(r.embedding) if r.embedding else None, r.owner, r.team)
        insert = sql.SQL(
            "INSERT INTO resources (workspace, kind, id, title, body, attributes, embedding,"
            " owner, team) VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s::vector, %s, %s)"
        )
        if create_only:
            cur = await conn.execute(
                insert + sql.SQL(" ON CONFLICT DO NOTHING RETURNING {}").format(_COLUMNS), values
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
                    " embedding = %s::vector, owner = %s, team = %s, version = version + 1,"
                    " updated_at = now() WHERE workspace = %s AND kind = %s AND id = %s"
                    " AND version = %s AND {} RETURNING {}"
                ).format(scope.condition if scope else sql.SQL("TRUE"), _COLUMNS),
                (*values[3:], r.workspace, r.kind, r.id, expected,
                 *(scope.params if scope else ())),
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
        return _row_to_resource(row), False, f"{r.kind}.put"

    async def _delete(
        self, conn: psycopg.AsyncConnection[Any], key: ResourceKey, expected: int | None,
        allow_missing: bool, scope: Predicate | None = None,
    ) -> tuple[Resource | None, bool, str | None]:
        where, params = _scoped(
            sql.SQL("workspace = %s AND kind = %s AND id = %s"),
            (key.workspace, key.kind, key.id), scope)
        cur = await conn.execute(
            sql.SQL(
                "DELETE FROM resources WHERE {} AND (%s::bigint IS NULL OR version = %s::bigint)"
                " RETURNING {}"
            ).format(where, _COLUMNS),
            (*params, expected, expected),
        )
        row = await cur.fetchone()
        if row is not None:
            return _row_to_resource(row), False, f"{key.kind}.delete"
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
        return None, True, None

    async def get_operation(self, name: str, caller: str) -> Operation:
        """An operation the caller started; NotFound otherwise (others' are invisible)."""
        try:
            op_id = uuid.UUID(name.removeprefix("operations/"))
        except ValueError:
            raise NotFound(f"operation {name} does not exist") from None
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT * FROM operations WHERE name = %s AND caller = %s", (op_id, caller)
            )
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"operation {name} does not exist")
        return _row_to_operation(row)

    async def list_operations(
        self, caller: str, *, limit: int, after: Sequence[Any] | None
    ) -> builtins.list[Operation]:
        """The caller's operations, newest first."""
        params: list[Any] = [caller]
        where = "caller = %s"
        if after is not None:
            where += " AND (created_at, name) < (%s::timestamptz, %s::uuid)"
            params.extend(after)
        params.append(limit)
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT * FROM operations WHERE {where}"  # noqa: S608 - fixed fragments only
                " ORDER BY created_at DESC, name DESC LIMIT %s",
                params,
            )
            rows = await cur.fetchall()
        return [_row_to_operation(r) for r in rows]


async def append_event(
    conn: psycopg.AsyncConnection[Any], event_type: str, key: ResourceKey | None,
    data: dict[str, Any], actor: str,
) -> int:
    """Append an event inside the caller's transaction; returns its sequence."""
    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_EVENT_LOCK,))
    cur = await conn.execute(
        "INSERT INTO events (sequence, type, workspace, kind, resource_id, data, actor)"
        " SELECT coalesce(max(sequence), 0) + 1, %s, %s, %s, %s, %s::jsonb, %s FROM events"
        " RETURNING sequence",
        (event_type, key.workspace if key else "", key.kind if key else "",
         key.id if key else "", json.dumps(data), actor),
    )
    row = await cur.fetchone()
    assert row is not None
    sequence = int(row["sequence"])
    await conn.execute("SELECT pg_notify(%s, %s)", (EVENTS_CHANNEL, str(sequence)))
    return sequence


def _row_to_operation(row: dict[str, Any]) -> Operation:
    result = row["result"] or {}
    res = result.get("resource")
    return Operation(
        name=f"operations/{row['name']}",
        caller=row["caller"],
        idempotency_key=row["idempotency_key"],
        command_type=row["command_type"],
        state=row["state"],
        result=Resource.from_json(res) if res else None,
        not_found=bool(result.get("not_found")),
        event_sequence=row["event_sequence"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )
