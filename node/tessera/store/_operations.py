"""Operations in PostgreSQL: the Execute write path, leases, recovery, listing, pruning.

Every change of an operation appends an `operation.<what>` event in the same transaction
(kind "operation", resource_id = the operation's uuid) and notifies OPERATIONS_CHANNEL, so
watchers in any node process wake up and re-read the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from tessera.core.errors import FailedPrecondition, NotFound, Unavailable
from tessera.core.pagination import query_hash
from tessera.store._effects import AuditIntent, effect_transaction, write_pending_audit
from tessera.store._predicate import Predicate
from tessera.store._resources import Pool, Resource, ResourceKey, ResourceStore, append_event

#: NOTIFY channel of operation changes; the payload is "<uuid>" or "<uuid> cancel".
OPERATIONS_CHANNEL = "tessera_operations"
#: Event kind of operation events; their resource_id is the operation's uuid.
OPERATION_EVENT_KIND = "operation"
DONE_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
#: State of a local caller's operation that runs on a peer (ExecuteRequest.target). No
#: runner claims, recovers or counts it; its state is the peer's, read through the peer.
FORWARDED = "FORWARDED"

_UNIQUE_KEY = "operations_caller_idempotency_key_key"


class _Gone(Exception):
    """Rolls an effect transaction back when the row it should change is not there."""


@dataclass(frozen=True)
class OperationError:
    """Why an operation failed or was cancelled: a google.rpc.Code, message and reason."""

    code: int
    message: str
    reason: str


@dataclass(frozen=True)
class Effect:
    """What a built-in command did inside the Execute transaction."""

    #: The resource written (put) or removed (delete); None when a delete found nothing.
    resource: Resource | None = None
    not_found: bool = False
    #: The resources of a batch put, in request order.
    batch: tuple[Resource, ...] | None = None
    #: (event type, resource) of each event to append, in order.
    events: tuple[tuple[str, Resource], ...] = ()


@dataclass(frozen=True)
class Operation:
    """A recorded command execution."""

    name: str
    caller: str
    idempotency_key: str
    command_type: str
    state: str
    result: Resource | None
    not_found: bool
    event_sequence: int | None
    created_at: datetime
    updated_at: datetime
    batch: tuple[Resource, ...] | None = None
    #: The JSON object a plugin handler returned.
    output: dict[str, Any] | None = None
    error: OperationError | None = None
    progress_percent: int = -1
    progress_message: str = ""
    cancel_requested: bool = False
    attempts: int = 0
    retry_safe: bool = False
    #: The validated arguments of a plugin command.
    input: dict[str, Any] | None = None
    #: The runner (node process) holding the lease of a running operation.
    lease_owner: str | None = None
    #: For a FORWARDED operation: the peer it runs on, and the peer's operation name
    #: (empty until the peer accepted it).
    forward_peer: str = ""
    forward_operation: str = ""
    #: When it finished (for a FORWARDED one: when this node first saw it done).
    finished_at: datetime | None = None

    @property
    def done(self) -> bool:
        """True when the state is final."""
        return self.state in DONE_STATES

    @property
    def uuid(self) -> str:
        """The name without its "operations/" prefix."""
        return self.name.removeprefix("operations/")


def operation_uuid(name: str) -> uuid.UUID | None:
    """The uuid an "operations/<uuid>" name carries, or None."""
    try:
        return uuid.UUID(name.removeprefix("operations/"))
    except ValueError:
        return None


def _row_to_operation(row: dict[str, Any]) -> Operation:
    result = row["result"] or {}
    res = result.get("resource")
    batch = result.get("batch")
    error = None
    if row["error_code"] is not None:
        error = OperationError(row["error_code"], row["error_message"] or "",
                               row.get("error_reason") or "")
    return Operation(
        name=f"operations/{row['name']}",
        caller=row["caller"],
        idempotency_key=row["idempotency_key"],
        command_type=row["command_type"],
        state=row["state"],
        result=Resource.from_json(res) if res else None,
        not_found=bool(result.get("not_found")),
        batch=tuple(Resource.from_json(r) for r in batch) if batch is not None else None,
        output=result.get("output"),
        error=error,
        event_sequence=row["event_sequence"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        progress_percent=row.get("progress_percent", -1),
        progress_message=row.get("progress_message", ""),
        cancel_requested=bool(row.get("cancel_requested")),
        attempts=int(row.get("attempts") or 0),
        retry_safe=bool(row.get("retry_safe")),
        input=row.get("input"),
        lease_owner=row.get("lease_owner"),
        forward_peer=row.get("forward_peer") or "",
        forward_operation=row.get("forward_operation") or "",
        finished_at=row.get("finished_at"),
    )


def snapshot(op: Operation) -> dict[str, Any]:
    """The mutable part of an operation, as an event's data."""
    return {
        "name": op.name, "command_type": op.command_type, "state": op.state,
        "progress": {"percent": op.progress_percent, "message": op.progress_message},
        "cancel_requested": op.cancel_requested, "attempts": op.attempts,
        "runner": op.lease_owner, "updated_at": op.updated_at.isoformat(),
    }


async def _changed(conn: psycopg.AsyncConnection[Any], row: dict[str, Any], what: str,
                   *, cancel: bool = False) -> Operation:
    """Append the operation's event and notify, inside the caller's transaction."""
    op = _row_to_operation(row)
    await append_event(conn, f"operation.{what}",
                       ResourceKey("", OPERATION_EVENT_KIND, op.uuid), snapshot(op), op.caller)
    payload = f"{op.uuid} cancel" if cancel else op.uuid
    await conn.execute("SELECT pg_notify(%s, %s)", (OPERATIONS_CHANNEL, payload))
    return op


_RECOVER_STATE = (
    "CASE WHEN cancel_requested THEN 'CANCELLED'"
    " WHEN retry_safe AND attempts < %(max_attempts)s THEN 'PENDING' ELSE 'FAILED' END"
)


# Error codes in the SQL are google.rpc.Code values: 1 CANCELLED, 10 ABORTED.
_RECOVER = sql.SQL(
    "UPDATE operations SET state = {state},"
    " lease_owner = NULL, lease_expires = NULL, updated_at = clock_timestamp(),"
    " finished_at = CASE WHEN {state} = 'PENDING' THEN NULL ELSE now() END,"
    " error_code = CASE {state} WHEN 'PENDING' THEN NULL"
    " WHEN 'CANCELLED' THEN 1 ELSE 10 END,"
    " error_message = CASE {state} WHEN 'PENDING' THEN NULL"
    " WHEN 'CANCELLED' THEN 'cancelled by the caller'"
    " ELSE 'the node running it stopped before it finished; its handler is not"
    " safe to retry, so check its effects and execute again with a new"
    " idempotency key' END,"
    " error_reason = CASE {state} WHEN 'PENDING' THEN NULL"
    " WHEN 'CANCELLED' THEN 'CANCELLED' ELSE 'NODE_RESTARTED' END"
    " WHERE state = 'RUNNING' AND {where} RETURNING *"
)


class OperationStore:
    """Reads and writes operations; each change appends its event in the same transaction."""

    def __init__(self, pool: Pool, resources: ResourceStore) -> None:
        self.pool = pool
        self.resources = resources

    # -- Execute ---------------------------------------------------------------------

    async def execute_put(
        self, *, caller: str, idempotency_key: str, resource: Resource,
        expected_version: int | None, create_only: bool, scope: Predicate | None = None,
    ) -> Operation:
        """Create or replace a resource, once per idempotency key.

        With `scope`, an existing row is replaced only if it is inside the scope too.
        """
        payload = {"put": resource.as_json(), "embedding": resource.embedding,
                   "expected": expected_version, "create_only": create_only}

        async def apply(conn: psycopg.AsyncConnection[Any]) -> Effect:
            r = await self.resources.apply_put(conn, resource, expected_version, create_only,
                                               scope)
            return Effect(resource=r, events=((f"{r.kind}.put", r),))

        return await self.execute_builtin(
            caller=caller, idempotency_key=idempotency_key, command_type="resource.put",
            request_hash=query_hash(payload), apply=apply)

    async def execute_delete(
        self, *, caller: str, idempotency_key: str, key: ResourceKey,
        expected_version: int | None, allow_missing: bool, scope: Predicate | None = None,
    ) -> Operation:
        """Delete a resource, once per idempotency key; rows outside `scope` look absent."""
        payload = {"delete": [key.workspace, key.kind, key.id], "expected": expected_version,
                   "allow_missing": allow_missing}

        async def apply(conn: psycopg.AsyncConnection[Any]) -> Effect:
            r = await self.resources.apply_delete(conn, key, expected_version, allow_missing,
                                                  scope)
            if r is None:
                return Effect(not_found=True)
            return Effect(resource=r, events=((f"{key.kind}.delete", r),))

        return await self.execute_builtin(
            caller=caller, idempotency_key=idempotency_key, command_type="resource.delete",
            request_hash=query_hash(payload), apply=apply)

    async def execute_batch_put(
        self, *, caller: str, idempotency_key: str,
        puts: Sequence[tuple[Resource, int | None, bool]], scope: Predicate | None = None,
    ) -> Operation:
        """Put every (resource, expected version, create only) in one transaction, once per
        idempotency key: all are written or, when one fails, none."""
        payload = {"batch_put": [[r.as_json(), r.embedding, e, c] for r, e, c in puts]}

        async def apply(conn: psycopg.AsyncConnection[Any]) -> Effect:
            written = []
            for r, expected, create_only in puts:
                written.append(await self.resources.apply_put(conn, r, expected, create_only,
                                                              scope))
            return Effect(batch=tuple(written),
                          events=tuple((f"{w.kind}.put", w) for w in written))

        return await self.execute_builtin(
            caller=caller, idempotency_key=idempotency_key, command_type="resource.batch_put",
            request_hash=query_hash(payload), apply=apply)

    async def _existing(
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

    async def execute_builtin(
        self,
        *,
        caller: str,
        idempotency_key: str,
        command_type: str,
        request_hash: str,
        apply: Callable[[psycopg.AsyncConnection[Any]], Awaitable[Effect]],
    ) -> Operation:
        """The Execute write path of a built-in command: its effect, its events and its
        SUCCEEDED operation row commit in one transaction, once per (caller, key).

        A replay with the same key and request returns the stored operation without
        applying anything; the same key with another request is FAILED_PRECONDITION.
        """
        for _attempt in range(2):
            try:
                # The call's audit record commits with the effect (a replay's with the
                # replay): see store.effect_transaction.
                async with effect_transaction(self.pool) as conn:
                    existing = await self._existing(conn, caller, idempotency_key, request_hash)
                    if existing is not None:
                        return existing
                    effect = await apply(conn)
                    sequence = None
                    for event_type, resource in effect.events:
                        # The payload holds nothing a reader of the event could not read
                        # through GetResource; team and owner are the row's, also for a
                        # delete (the row is gone by the time of the append).
                        sequence = await append_event(
                            conn, event_type, resource.key,
                            {"version": resource.version, "etag": resource.etag}, caller,
                            team=resource.team, owner=resource.owner,
                            origin=self.resources.origin,
                        )
                    result: dict[str, Any] = {"not_found": effect.not_found}
                    if effect.batch is not None:
                        result["batch"] = [r.as_json() for r in effect.batch]
                    else:
                        result["resource"] = effect.resource.as_json() if effect.resource \
                            else None
                    cur = await conn.execute(
                        "INSERT INTO operations (name, caller, idempotency_key, request_hash,"
                        " command_type, state, result, event_sequence, progress_percent,"
                        " attempts, started_at, finished_at)"
                        " VALUES (%s, %s, %s, %s, %s, 'SUCCEEDED', %s::jsonb, %s, 100, 1,"
                        " now(), now()) RETURNING *",
                        (uuid.uuid4(), caller, idempotency_key, request_hash, command_type,
                         json.dumps(result), sequence),
                    )
                    row = await cur.fetchone()
                    assert row is not None
                    return _row_to_operation(row)
            except psycopg.errors.UniqueViolation as exc:
                # A concurrent call with the same key committed first; our transaction (and
                # its write) rolled back. Loop once to return the winner's operation.
                if exc.diag.constraint_name != _UNIQUE_KEY:
                    raise
        raise FailedPrecondition("idempotency_key is being used concurrently; retry",
                                 reason="IDEMPOTENCY_CONFLICT")

    async def create_pending(
        self,
        *,
        caller: str,
        idempotency_key: str,
        command_type: str,
        request_hash: str,
        input: dict[str, Any],
        retry_safe: bool,
    ) -> tuple[Operation, bool]:
        """Store a long-running command as PENDING, once per (caller, key).

        Returns the operation and whether this call created it (only the creator may start
        it). Concurrent duplicates wait on the unique key and get the one stored row. The
        call's audit record commits with the stored row.
        """
        async with effect_transaction(self.pool) as conn:
            cur = await conn.execute(
                "INSERT INTO operations (name, caller, idempotency_key, request_hash,"
                " command_type, state, input, retry_safe)"
                " VALUES (%s, %s, %s, %s, %s, 'PENDING', %s::jsonb, %s)"
                " ON CONFLICT (caller, idempotency_key) DO NOTHING RETURNING *",
                (uuid.uuid4(), caller, idempotency_key, request_hash, command_type,
                 json.dumps(input), retry_safe),
            )
            row = await cur.fetchone()
            if row is None:
                existing = await self._existing(conn, caller, idempotency_key, request_hash)
                assert existing is not None
                return existing, False
            return await _changed(conn, row, "pending"), True

    # -- commands to peers ----------------------------------------------------------

    async def create_forward(
        self, *, caller: str, idempotency_key: str, command_type: str, request_hash: str,
        peer: str, audit: Callable[[Operation], AuditIntent | None] | None = None,
    ) -> Operation:
        """Reserve (caller, key) for a command executed on `peer`: a FORWARDED row, or the
        one already stored for the same request (FailedPrecondition for another request).
        `audit(op)` (the record of this attempt to send it) commits with the reservation,
        so a command never leaves this node unaudited, whatever the peer answers.

        Nothing runs here and no runner ever claims it (claims take PENDING rows only).
        """
        record: AuditIntent | None = None
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "INSERT INTO operations (name, caller, idempotency_key, request_hash,"
                " command_type, state, forward_peer)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (caller, idempotency_key) DO NOTHING RETURNING *",
                (uuid.uuid4(), caller, idempotency_key, request_hash, command_type,
                 FORWARDED, peer),
            )
            row = await cur.fetchone()
            if row is not None:
                op = _row_to_operation(row)
            else:
                found = await self._existing(conn, caller, idempotency_key, request_hash)
                assert found is not None
                op = found
            if audit is not None and not op.forward_operation:
                record = audit(op)
                if record is not None:
                    await write_pending_audit(conn, record)
        if record is not None:
            record.committed()
        return op

    async def forwarded(self, name: str, remote: str,
                        audit: AuditIntent | None) -> Operation | None:
        """Record that the peer accepted a FORWARDED operation as `remote`; `audit` (the
        forwarding record) and the call's own record commit in the same transaction. None
        when the reservation is gone or maps to another remote operation."""
        try:
            async with effect_transaction(self.pool) as conn:
                if audit is not None:
                    await write_pending_audit(conn, audit)
                cur = await conn.execute(
                    "UPDATE operations SET forward_operation = %s,"
                    " updated_at = clock_timestamp() WHERE name = %s AND state = %s"
                    " AND (forward_operation IS NULL OR forward_operation = %s) RETURNING *",
                    (remote, operation_uuid(name), FORWARDED, remote),
                )
                row = await cur.fetchone()
                if row is None:
                    raise _Gone  # inside: the audit records are not written either
        except _Gone:
            return None
        if audit is not None:
            audit.committed()
        return _row_to_operation(row)

    async def drop_forward(self, name: str) -> None:
        """Forget a reservation the peer refused (its key is free again)."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "DELETE FROM operations WHERE name = %s AND state = %s"
                " AND forward_operation IS NULL", (operation_uuid(name), FORWARDED))

    async def touch_forward(self, name: str, *, done: bool,
                            audit: AuditIntent | None = None) -> None:
        """Note a relayed change of a FORWARDED operation (with `audit`, e.g. a forwarded
        cancel's record, in the same transaction); `done` starts its retention."""
        async with effect_transaction(self.pool, audit) as conn:
            await conn.execute(
                "UPDATE operations SET updated_at = clock_timestamp(), finished_at ="
                " CASE WHEN %s THEN coalesce(finished_at, now()) ELSE finished_at END"
                " WHERE name = %s AND state = %s", (done, operation_uuid(name), FORWARDED))

    # -- the runner ------------------------------------------------------------------

    async def claim(self, name: str, owner: str, lease_s: float) -> Operation | None:
        """Take a PENDING operation by name for `owner`: RUNNING with a lease. None if taken."""
        return await self._claim("name = %(name)s::uuid AND state = 'PENDING'",
                                 {"name": operation_uuid(name), "owner": owner,
                                  "lease": lease_s})

    async def claim_next(self, owner: str, lease_s: float, types: Sequence[str],
                         older_than_s: float) -> Operation | None:
        """Take the oldest PENDING operation of one of `types` created before the grace."""
        return await self._claim(
            "name = (SELECT name FROM operations WHERE state = 'PENDING'"
            " AND command_type = ANY(%(types)s)"
            " AND created_at < now() - make_interval(secs => %(grace)s)"
            " ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)",
            {"types": list(types), "grace": older_than_s, "owner": owner, "lease": lease_s},
        )

    async def _claim(self, where: str, params: dict[str, Any]) -> Operation | None:
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                sql.SQL(
                    "UPDATE operations SET state = 'RUNNING', lease_owner = %(owner)s,"
                    " lease_expires = now() + make_interval(secs => %(lease)s),"
                    " attempts = attempts + 1, started_at = coalesce(started_at, now()),"
                    " updated_at = clock_timestamp() WHERE {} RETURNING *"
                ).format(sql.SQL(where)),
                params,
            )
            row = await cur.fetchone()
            if row is None:
                return None
            return await _changed(conn, row, "running")

    async def renew(self, name: str, owner: str, lease_s: float) -> tuple[bool, bool]:
        """Extend `owner`'s lease: (still held, cancel requested)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE operations SET lease_expires = now() + make_interval(secs => %s)"
                " WHERE name = %s AND lease_owner = %s AND state = 'RUNNING'"
                " RETURNING cancel_requested",
                (lease_s, operation_uuid(name), owner),
            )
            row = await cur.fetchone()
        if row is None:
            return False, False
        return True, bool(row["cancel_requested"])

    async def report_progress(self, name: str, owner: str, percent: int,
                              message: str) -> bool:
        """Record progress of a running operation `owner` holds; False if it lost it."""
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "UPDATE operations SET progress_percent = %s, progress_message = %s,"
                " updated_at = clock_timestamp()"
                " WHERE name = %s AND lease_owner = %s AND state = 'RUNNING' RETURNING *",
                (percent, message, operation_uuid(name), owner),
            )
            row = await cur.fetchone()
            if row is None:
                return False
            await _changed(conn, row, "progress")
            return True

    async def append_output(self, name: str, owner: str, text: str) -> bool:
        """Record output of a running operation `owner` holds, as an `operation.output`
        event; False if it no longer holds it."""
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "SELECT * FROM operations WHERE name = %s AND lease_owner = %s"
                " AND state = 'RUNNING' FOR SHARE",
                (operation_uuid(name), owner),
            )
            row = await cur.fetchone()
            if row is None:
                return False
            op = _row_to_operation(row)
            await append_event(conn, "operation.output",
                               ResourceKey("", OPERATION_EVENT_KIND, op.uuid),
                               {"name": op.name, "text": text, "runner": owner}, op.caller)
            await conn.execute("SELECT pg_notify(%s, %s)", (OPERATIONS_CHANNEL, op.uuid))
            return True

    async def finish(
        self, name: str, owner: str, *, state: str, output: dict[str, Any] | None = None,
        error: OperationError | None = None,
    ) -> Operation | None:
        """End a running operation `owner` holds; None if its lease was lost meanwhile."""
        assert state in DONE_STATES
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "UPDATE operations SET state = %s, result = %s::jsonb, error_code = %s,"
                " error_message = %s, error_reason = %s, lease_owner = NULL,"
                " lease_expires = NULL, finished_at = now(), updated_at = clock_timestamp(),"
                " progress_percent = CASE WHEN %s = 'SUCCEEDED' THEN 100"
                " ELSE progress_percent END"
                " WHERE name = %s AND lease_owner = %s AND state = 'RUNNING' RETURNING *",
                (state, json.dumps({"output": output}) if output is not None else None,
                 error.code if error else None, error.message if error else None,
                 error.reason if error else None, state, operation_uuid(name), owner),
            )
            row = await cur.fetchone()
            if row is None:
                return None
            return await _changed(conn, row, state.lower())

    async def recover(self, *, max_attempts: int, owner: str | None = None) -> list[Operation]:
        """End RUNNING operations whose lease expired (or, with `owner`, that owner's).

        A retry-safe one goes back to PENDING (until max_attempts starts); one whose
        cancellation was requested ends CANCELLED; any other ends FAILED, NODE_RESTARTED.
        """
        where = ("lease_owner = %(owner)s" if owner is not None
                 else "lease_expires < now()")
        query = _RECOVER.format(state=sql.SQL(_RECOVER_STATE),
                                where=sql.SQL(where))
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(query, {"max_attempts": max_attempts, "owner": owner})
            rows = await cur.fetchall()
            out = []
            for row in rows:
                what = "retried" if row["state"] == "PENDING" else row["state"].lower()
                out.append(await _changed(conn, row, what))
            return out

    async def request_cancel(self, name: str, caller: str) -> Operation:
        """Cancel the caller's operation: a PENDING one ends CANCELLED at once, a RUNNING
        one is flagged and its runner told. FailedPrecondition when it is already done."""
        op_id = operation_uuid(name)
        if op_id is None:
            raise NotFound(f"operation {name} does not exist")
        async with effect_transaction(self.pool) as conn:
            cur = await conn.execute(
                "UPDATE operations SET cancel_requested = true, updated_at = clock_timestamp(),"
                " state = CASE WHEN state = 'PENDING' THEN 'CANCELLED' ELSE state END,"
                " finished_at = CASE WHEN state = 'PENDING' THEN now() END,"
                " error_code = CASE WHEN state = 'PENDING' THEN 1 END,"
                " error_message = CASE WHEN state = 'PENDING'"
                " THEN 'cancelled by the caller' END,"
                " error_reason = CASE WHEN state = 'PENDING' THEN 'CANCELLED' END"
                " WHERE name = %s AND caller = %s AND state IN ('PENDING', 'RUNNING')"
                " RETURNING *",
                (op_id, caller),
            )
            row = await cur.fetchone()
            if row is not None:
                what = "cancelled" if row["state"] == "CANCELLED" else "cancel_requested"
                return await _changed(conn, row, what, cancel=row["state"] == "RUNNING")
            # Raised inside the transaction: nothing changed, so no success is recorded.
            op = await self.get(name, caller)
            raise FailedPrecondition(
                f"operation {name} is already done ({op.state}) and cannot be cancelled",
                reason="OPERATION_DONE",
            )

    async def prune(self, older_than_s: float) -> int:
        """Delete operations finished more than `older_than_s` ago; how many."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "DELETE FROM operations"
                " WHERE finished_at < now() - make_interval(secs => %s)", (older_than_s,)
            )
            pruned = cur.rowcount
            # A forwarded operation never seen done is kept as long, from its creation
            # (its peer has pruned its own operation by then).
            cur = await conn.execute(
                "DELETE FROM operations WHERE state = %s"
                " AND created_at < now() - make_interval(secs => %s)", (FORWARDED, older_than_s)
            )
            return pruned + cur.rowcount

    # -- reads -----------------------------------------------------------------------

    async def by_key(self, caller: str, idempotency_key: str,
                     request_hash: str) -> Operation | None:
        """The caller's operation with this key, if any (FailedPrecondition when the key
        was used for another request) — e.g. to answer a retry before re-admitting it."""
        async with self.pool.connection() as conn:
            return await self._existing(conn, caller, idempotency_key, request_hash)

    @contextlib.asynccontextmanager
    async def exclusive(self, key: str, wait_s: float = 10.0) -> AsyncIterator[None]:
        """Hold the cluster-wide advisory lock `key` (every node process on this store):
        e.g. so a cap's count and the insert it admits are one step for all of them.

        A waiter holds no pooled connection (it retries pg_try_advisory_lock), so callers
        piling up cannot drain the pool; Unavailable after `wait_s`.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            async with self.pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT pg_try_advisory_lock(hashtext(%s)) AS ok", (key,))
                row = await cur.fetchone()
                if row is not None and row["ok"]:
                    try:
                        yield
                    finally:
                        await conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (key,))
                    return
            if loop.time() > deadline:
                raise Unavailable(f"busy admitting other {key} calls; retry shortly")
            await asyncio.sleep(0.02)

    async def count_active(self, command_type: str, input_contains: Mapping[str, Any]) -> int:
        """PENDING or RUNNING operations of a type whose input contains `input_contains`
        (jsonb containment); e.g. the agent runs of one grant, for a concurrency cap."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT count(*) AS n FROM operations WHERE command_type = %s"
                " AND state IN ('PENDING', 'RUNNING') AND input @> %s::jsonb",
                (command_type, json.dumps(dict(input_contains))))
            row = await cur.fetchone()
        return int(row["n"]) if row is not None else 0

    async def get(self, name: str, caller: str) -> Operation:
        """An operation the caller started; NotFound otherwise (others' are invisible)."""
        op_id = operation_uuid(name)
        if op_id is None:
            raise NotFound(f"operation {name} does not exist")
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT * FROM operations WHERE name = %s AND caller = %s", (op_id, caller)
            )
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"operation {name} does not exist")
        return _row_to_operation(row)

    async def changes(self, name: str, after: int) -> list[tuple[int, str, dict[str, Any]]]:
        """(sequence, event type, snapshot) of the operation's events after `after`."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT sequence, type, data FROM events WHERE kind = %s AND resource_id = %s"
                " AND workspace = '' AND peer = '' AND sequence > %s ORDER BY sequence",
                (OPERATION_EVENT_KIND, name.removeprefix("operations/"), after),
            )
            rows = await cur.fetchall()
        return [(int(r["sequence"]), r["type"], r["data"]) for r in rows]

    async def last_change(self, name: str) -> int:
        """Sequence of the operation's latest event (0 when none)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT coalesce(max(sequence), 0) AS s FROM events WHERE kind = %s"
                " AND resource_id = %s AND workspace = '' AND peer = ''",
                (OPERATION_EVENT_KIND, name.removeprefix("operations/")),
            )
            row = await cur.fetchone()
        return int(row["s"]) if row else 0

    async def list(
        self, caller: str, *, limit: int, after: Sequence[Any] | None, state: str = "",
        command_type: str = "",
    ) -> list[Operation]:
        """The caller's operations, newest first, optionally of one state and type.

        FORWARDED operations are not listed (their state is the peer's); they are read
        by name."""
        params: list[Any] = [caller, FORWARDED]
        where = "caller = %s AND state <> %s"
        if state:
            where += " AND state = %s"
            params.append(state)
        if command_type:
            where += " AND command_type = %s"
            params.append(command_type)
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
