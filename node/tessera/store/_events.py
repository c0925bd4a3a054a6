"""The event log in PostgreSQL: appends, scoped reads, retention and durable subscriptions.

Sequence order is commit order. Every append updates the one `event_log` row in its own
transaction and holds that row lock until it commits, so transaction B can take its
sequences only after A (with lower ones) has committed and become visible. A reader that
has seen sequence s therefore never later finds a committed sequence below s it did not
see, and sequences are dense (a rolled-back append rolls the counter back too). The price
is that appends commit one after another; a batch append shares one commit.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from tessera.core.errors import FailedPrecondition, FieldViolation, InvalidArgument
from tessera.store._effects import effect_transaction
from tessera.store._predicate import Predicate

EVENTS_CHANNEL = "tessera_events"
#: Serialises pruning across replicas (they all run it; one at a time does the work).
_PRUNE_LOCK = 0x7E55E7A2

_EVENT_COLUMNS = sql.SQL(
    "sequence, id, type, workspace, kind, resource_id, team, owner, data, actor, origin,"
    " created_at, idempotency_key, request_hash, peer, origin_id, origin_time"
)
#: The relation a peer's read uses: this node's own events only (migration 0012). A
#: received event is never in it, so no grant can re-share it.
_SHAREABLE = sql.Identifier("events_shareable")
_ALL_EVENTS = sql.Identifier("events")


@dataclass(frozen=True)
class NewEvent:
    """An event to append. Team and owner None: taken from the subject row, if any."""

    type: str
    workspace: str = ""
    kind: str = ""
    resource_id: str = ""
    data: dict[str, Any] | None = None
    idempotency_key: str = ""
    request_hash: str = ""
    team: str | None = None
    owner: str | None = None


@dataclass(frozen=True)
class StoredEvent:
    """One event of the log, with what scope decisions use recorded at append time."""

    sequence: int
    id: uuid.UUID
    type: str
    workspace: str
    kind: str
    resource_id: str
    team: str
    owner: str
    data: dict[str, Any]
    actor: str
    origin: str
    created_at: datetime
    idempotency_key: str = ""
    request_hash: str = ""
    #: The followed peer (local name) this event was received from; "" for our own.
    peer: str = ""
    #: Its id and time on the node that produced it (received events only).
    origin_id: uuid.UUID | None = None
    origin_time: datetime | None = None

    @property
    def received(self) -> bool:
        """Whether the event was received from a followed peer (never shared onward)."""
        return bool(self.peer)

    @property
    def has_subject(self) -> bool:
        """Whether the event concerns a resource."""
        return bool(self.resource_id)


@dataclass(frozen=True)
class LogState:
    """The log's identity, head and retention watermark, read in one snapshot."""

    log_id: uuid.UUID
    #: Highest committed sequence.
    head: int
    #: Every sequence up to this one has been pruned; a position below it has a gap.
    pruned_through: int


@dataclass(frozen=True)
class Page:
    """Events after a position, and how far the read has looked."""

    events: list[StoredEvent]
    #: The position the next read starts after: the last event's sequence when the page
    #: is full, else the head at the read's snapshot (everything up to it was examined).
    scanned_through: int
    state: LogState


@dataclass(frozen=True)
class Subscription:
    """A durable subscription: its owner, name, patterns and acknowledged position."""

    caller: str
    name: str
    type_patterns: list[str]
    acked_sequence: int
    created_at: datetime
    updated_at: datetime


def _row_to_event(row: dict[str, Any]) -> StoredEvent:
    return StoredEvent(
        sequence=int(row["sequence"]), id=row["id"], type=row["type"],
        workspace=row["workspace"], kind=row["kind"], resource_id=row["resource_id"],
        team=row["team"], owner=row["owner"], data=row["data"] or {}, actor=row["actor"],
        origin=row["origin"], created_at=row["created_at"],
        idempotency_key=row["idempotency_key"], request_hash=row["request_hash"],
        peer=row["peer"], origin_id=row["origin_id"], origin_time=row["origin_time"],
    )


def _row_to_subscription(row: dict[str, Any]) -> Subscription:
    return Subscription(
        caller=row["caller"], name=row["name"], type_patterns=list(row["type_patterns"]),
        acked_sequence=int(row["acked_sequence"]), created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


async def append_events(
    conn: psycopg.AsyncConnection[Any], events: Sequence[NewEvent], *, actor: str,
    origin: str,
) -> list[StoredEvent]:
    """Append events inside the caller's transaction, in order; returns them stored.

    Holds the `event_log` row lock until the caller's transaction ends (see the module
    docstring), and notifies listeners when it commits.
    """
    if not events:
        return []
    n = len(events)
    cur = await conn.execute(
        sql.SQL(
            "WITH c AS (UPDATE event_log SET last_sequence = last_sequence + %s WHERE id = 1"
            "   RETURNING last_sequence - %s AS base)"
            " INSERT INTO events (sequence, type, workspace, kind, resource_id, team, owner,"
            "   data, actor, origin, idempotency_key, request_hash)"
            " SELECT c.base + u.ord, u.type, u.ws, u.kind, u.rid,"
            "   coalesce(u.team, r.team, ''), coalesce(u.owner, r.owner, ''), u.data::jsonb,"
            "   %s, %s, u.ikey, u.rhash"
            " FROM c CROSS JOIN unnest(%s::text[], %s::text[], %s::text[], %s::text[],"
            "   %s::text[], %s::text[], %s::text[], %s::text[], %s::text[])"
            "   WITH ORDINALITY AS u(type, ws, kind, rid, team, owner, data, ikey, rhash, ord)"
            " LEFT JOIN resources r ON u.rid <> '' AND r.workspace = u.ws AND r.kind = u.kind"
            "   AND r.id = u.rid"
            " RETURNING {}"
        ).format(_EVENT_COLUMNS),
        (n, n, actor, origin,
         [e.type for e in events], [e.workspace for e in events], [e.kind for e in events],
         [e.resource_id for e in events], [e.team for e in events],
         [e.owner for e in events], [json.dumps(e.data or {}) for e in events],
         [e.idempotency_key for e in events], [e.request_hash for e in events]),
    )
    stored = sorted((_row_to_event(r) for r in await cur.fetchall()), key=lambda e: e.sequence)
    await conn.execute("SELECT pg_notify(%s, %s)", (EVENTS_CHANNEL, str(stored[-1].sequence)))
    return stored


class EventStore:
    """Reads and writes the event log and durable subscriptions."""

    def __init__(self, pool: Any, *, origin: str) -> None:
        self.pool = pool
        self.origin = origin

    async def publish(self, events: Sequence[NewEvent], *, actor: str) -> list[StoredEvent]:
        """Append application events once per (actor, idempotency key), in one transaction.

        An event whose key the actor used before is answered with the earlier event (the
        same id and sequence) if the request was the same, else FailedPrecondition.
        """
        for _attempt in range(3):
            try:
                # The publish and its audit record commit together, or neither does.
                async with effect_transaction(self.pool) as conn:
                    return await self._publish(conn, events, actor)
            except psycopg.errors.UniqueViolation as exc:
                # A concurrent publish with the same key committed first; ours rolled back.
                if exc.diag.constraint_name != "events_idempotency_idx":
                    raise
        raise FailedPrecondition("idempotency_key is being used concurrently; retry",
                                 reason="IDEMPOTENCY_CONFLICT")

    async def _publish(self, conn: psycopg.AsyncConnection[Any], events: Sequence[NewEvent],
                       actor: str) -> list[StoredEvent]:
        keys = sorted({e.idempotency_key for e in events if e.idempotency_key})
        earlier: dict[str, StoredEvent] = {}
        if keys:
            cur = await conn.execute(
                sql.SQL("SELECT {} FROM events WHERE actor = %s"
                        " AND idempotency_key = ANY(%s::text[])").format(_EVENT_COLUMNS),
                (actor, keys),
            )
            earlier = {r["idempotency_key"]: _row_to_event(r) for r in await cur.fetchall()}
        fresh: list[NewEvent] = []
        first_of_key: dict[str, NewEvent] = {}
        for i, e in enumerate(events):
            seen = earlier.get(e.idempotency_key) if e.idempotency_key else None
            if seen is not None and seen.request_hash != e.request_hash:
                raise FailedPrecondition(
                    f"idempotency_key {e.idempotency_key!r} was already used for a different "
                    "event; use a new key", reason="IDEMPOTENCY_KEY_REUSED")
            if seen is not None:
                continue
            if e.idempotency_key:
                twin = first_of_key.get(e.idempotency_key)
                if twin is not None:
                    if twin.request_hash != e.request_hash:
                        raise InvalidArgument([FieldViolation(
                            f"events[{i}].idempotency_key",
                            "is used twice in this batch for different events")])
                    continue
                first_of_key[e.idempotency_key] = e
            fresh.append(e)
        stored = await append_events(conn, fresh, actor=actor, origin=self.origin)
        by_key = {**earlier, **{s.idempotency_key: s for s in stored if s.idempotency_key}}
        out: list[StoredEvent] = []
        it = iter(stored)
        for e in events:
            if e.idempotency_key:
                out.append(by_key[e.idempotency_key])
            else:
                out.append(next(it))
        return out

    async def state(self) -> LogState:
        """The log's id, head and retention watermark."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT l.log_id, l.last_sequence, r.pruned_through"
                " FROM event_log l, event_retention r WHERE l.id = 1 AND r.id = 1"
            )
            row = await cur.fetchone()
        assert row is not None
        return LogState(row["log_id"], int(row["last_sequence"]), int(row["pruned_through"]))

    async def read(
        self, *, after: int, limit: int, like_patterns: Sequence[str],
        grant_like_patterns: Sequence[str] | None = None, scope: Predicate | None = None,
        window: int = 0, for_peer: bool = False, origins: Sequence[str] | None = None,
    ) -> Page:
        """Up to `limit` events after `after`, oldest first, matching the filters.

        `grant_like_patterns` and `scope` are a peer's: only events of a type its grant
        lists, with a subject, whose recorded workspace, kind, team and owner the scope
        may read (the scope's own SQL, over the event's recorded columns). A read for a
        peer (`for_peer`, or either of those given) selects from `events_shareable`, which
        holds only this node's own events: a received event is never served to a peer.

        `origins` keeps events of those followed peers (local names; "" is this node).

        `window` > 0 bounds the sequences one read examines, so a selective filter over a
        long log costs many short reads instead of one that outlives the statement timeout.
        """
        where: list[sql.Composable] = [sql.SQL("sequence > %s"),
                                       sql.SQL("type LIKE ANY(%s::text[])")]
        params: list[Any] = [after, list(like_patterns)]
        if window > 0:
            where.append(sql.SQL("sequence <= %s"))
            params.append(after + window)
        if grant_like_patterns is not None:
            where.append(sql.SQL("type LIKE ANY(%s::text[])"))
            params.append(list(grant_like_patterns))
        if scope is not None:
            where.append(sql.SQL("resource_id <> ''"))
            where.append(scope.condition)
            params.extend(scope.params)
        if origins is not None:
            where.append(sql.SQL("peer = ANY(%s::text[])"))
            params.append(list(origins))
        shared = for_peer or grant_like_patterns is not None or scope is not None
        params.append(limit)
        query = sql.SQL(
            "WITH s AS (SELECT l.log_id, l.last_sequence, r.pruned_through"
            "   FROM event_log l, event_retention r WHERE l.id = 1 AND r.id = 1),"
            " e AS (SELECT {cols} FROM {rel} WHERE {where} ORDER BY sequence LIMIT %s)"
            " SELECT s.log_id AS s_log_id, s.last_sequence AS s_head,"
            "   s.pruned_through AS s_pruned, e.* FROM s LEFT JOIN e ON true"
            " ORDER BY e.sequence"
        ).format(cols=_EVENT_COLUMNS, rel=_SHAREABLE if shared else _ALL_EVENTS,
                 where=sql.SQL(" AND ").join(where))
        async with self.pool.connection() as conn:
            cur = await conn.execute(query, params)
            rows = await cur.fetchall()
        first = rows[0]
        state = LogState(first["s_log_id"], int(first["s_head"]), int(first["s_pruned"]))
        events = [_row_to_event(r) for r in rows if r["sequence"] is not None]
        # The head may be read before an append that commits during the statement; events
        # above it can still appear in `e`, so never report less than what was returned.
        if len(events) >= limit:
            scanned = events[-1].sequence
        else:  # everything up to the head (or the window's end) was examined
            scanned = min(state.head, after + window) if window > 0 else state.head
            scanned = max(scanned, after, events[-1].sequence if events else after)
        return Page(events, scanned, state)

    async def prune(self, *, max_age_s: float, max_count: int) -> int:
        """Delete the oldest events beyond retention; returns how many. One replica at a time.

        Only a prefix of the log is ever deleted, and the watermark moves in the same
        transaction, so a reader either finds an event or learns it is gone.
        """
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s) AS got",
                                     (_PRUNE_LOCK,))
            row = await cur.fetchone()
            if not row or not row["got"]:
                return 0
            cur = await conn.execute(
                "SELECT greatest("
                "  CASE WHEN %s > 0 THEN (SELECT max(sequence) FROM events"
                "       WHERE created_at < now() - make_interval(secs => %s)) END,"
                "  CASE WHEN %s > 0 THEN (SELECT last_sequence - %s FROM event_log"
                "       WHERE id = 1) END) AS target",
                (max_age_s, max_age_s, max_count, max_count),
            )
            row = await cur.fetchone()
            target = row["target"] if row else None
            if target is None or target <= 0:
                return 0
            cur = await conn.execute(
                "WITH d AS (DELETE FROM events WHERE sequence <= %s RETURNING sequence)"
                " SELECT count(*) AS n FROM d", (target,))
            row = await cur.fetchone()
            await conn.execute(
                "UPDATE event_retention SET pruned_through = greatest(pruned_through, %s),"
                " pruned_at = now() WHERE id = 1", (target,))
        return int(row["n"]) if row else 0

    # -- durable subscriptions ----------------------------------------------------------

    async def get_subscription(self, caller: str, name: str) -> Subscription | None:
        """The caller's subscription of that name (others' are invisible)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT * FROM event_subscriptions WHERE caller = %s AND name = %s",
                (caller, name))
            row = await cur.fetchone()
        return _row_to_subscription(row) if row else None

    async def create_subscription(self, caller: str, name: str, patterns: Sequence[str],
                                  acked: int, *, max_per_caller: int) -> Subscription:
        """Create it (or return the one a concurrent call created), within the caller's cap."""
        async with self.pool.connection() as conn, conn.transaction():
            # Serialise creations per caller so the cap holds under concurrency.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 7))",
                               (caller,))
            cur = await conn.execute(
                "SELECT count(*) AS n FROM event_subscriptions WHERE caller = %s", (caller,))
            row = await cur.fetchone()
            if row is not None and int(row["n"]) >= max_per_caller:
                raise FailedPrecondition(
                    f"this caller already has {max_per_caller} durable subscriptions, the "
                    "most allowed; delete one or use an ephemeral stream",
                    reason="TOO_MANY_SUBSCRIPTIONS")
            cur = await conn.execute(
                "INSERT INTO event_subscriptions (caller, name, type_patterns, acked_sequence)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (caller, name) DO UPDATE"
                " SET caller = EXCLUDED.caller RETURNING *",
                (caller, name, list(patterns), acked))
            row = await cur.fetchone()
        assert row is not None
        return _row_to_subscription(row)

    async def update_subscription(self, caller: str, name: str, *,
                                  patterns: Sequence[str] | None,
                                  acked: int | None) -> Subscription | None:
        """Replace its patterns and/or move its position (a seek); None if absent."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE event_subscriptions SET"
                " type_patterns = coalesce(%s::text[], type_patterns),"
                " acked_sequence = coalesce(%s::bigint, acked_sequence), updated_at = now()"
                " WHERE caller = %s AND name = %s RETURNING *",
                (list(patterns) if patterns is not None else None, acked, caller, name))
            row = await cur.fetchone()
        return _row_to_subscription(row) if row else None

    async def ack(self, caller: str, name: str, sequence: int) -> Subscription | None:
        """Move the position forward to `sequence` (never back); None if absent."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE event_subscriptions SET"
                " acked_sequence = greatest(acked_sequence, %s), updated_at = now()"
                " WHERE caller = %s AND name = %s RETURNING *",
                (sequence, caller, name))
            row = await cur.fetchone()
        return _row_to_subscription(row) if row else None

    async def delete_subscription(self, caller: str, name: str) -> bool:
        """Delete the caller's subscription; False if it has none of that name."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "DELETE FROM event_subscriptions WHERE caller = %s AND name = %s RETURNING name",
                (caller, name))
            row = await cur.fetchone()
        return row is not None
