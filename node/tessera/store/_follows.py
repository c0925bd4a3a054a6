"""Following peers in PostgreSQL: the follow settings and state, received events, forget.

A received event is appended to this node's own log (so local streams deliver it in
sequence order with everything else) with `peer` set to the followed peer's local name,
`origin` to its SPIFFE id and `origin_id` to the event's id there. Peers are served from
`events_shareable` (this node's own events only), so a received event never leaves this
node. Duplicates are dropped by (peer, origin_id), and the peer's cursor is written in the
same transaction as the events, so the cursor never runs ahead of what was stored.
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

from tessera.core.errors import FailedPrecondition, NotFound
from tessera.store._effects import effect_transaction
from tessera.store._events import _EVENT_COLUMNS, EVENTS_CHANNEL

#: Follow states, as shown by `tessera peers list`, doctor and metrics.
STATES = ("starting", "connected", "backoff", "standby", "stopped")


@dataclass(frozen=True)
class Follow:
    """One followed peer: its settings and the follower's last known state."""

    peer: str
    enabled: bool
    type_patterns: list[str]
    #: The peer's cursor after the last event stored here ('' before the first).
    cursor: str
    state: str
    last_error: str
    received: int
    duplicates: int
    last_event_time: datetime | None
    last_received_at: datetime | None
    updated_at: datetime


@dataclass(frozen=True)
class ReceivedEvent:
    """One event as a followed peer delivered it (already validated)."""

    origin_id: uuid.UUID
    type: str
    workspace: str
    kind: str
    resource_id: str
    data: dict[str, Any]
    actor: str
    origin_time: datetime | None


class FollowStopped(Exception):
    """The follow was switched off or forgotten: the received batch was not stored."""


def _row_to_follow(row: dict[str, Any]) -> Follow:
    return Follow(
        peer=row["peer"], enabled=bool(row["enabled"]),
        type_patterns=list(row["type_patterns"]), cursor=row["cursor"], state=row["state"],
        last_error=row["last_error"], received=int(row["received"]),
        duplicates=int(row["duplicates"]), last_event_time=row["last_event_time"],
        last_received_at=row["last_received_at"], updated_at=row["updated_at"],
    )


async def store_received(conn: psycopg.AsyncConnection[Any], *, peer: str, origin: str,
                         events: Sequence[ReceivedEvent], cursor: str) -> tuple[int, int]:
    """Append a followed peer's events and move its cursor, in one transaction on `conn`.

    Returns (stored, duplicates). Raises FollowStopped (nothing written) if the follow is
    no longer enabled: the row lock taken first also orders this against `forget`.
    """
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT enabled FROM peer_follows WHERE peer = %s FOR UPDATE", (peer,))
        row = await cur.fetchone()
        if row is None or not _get(row, "enabled", 0):
            raise FollowStopped(peer)
        fresh: list[ReceivedEvent] = []
        seen: set[uuid.UUID] = set()
        if events:
            cur = await conn.execute(
                "SELECT origin_id FROM events WHERE peer = %s AND origin_id = ANY(%s::uuid[])",
                (peer, [e.origin_id for e in events]))
            seen = {_get(r, "origin_id", 0) for r in await cur.fetchall()}
        for e in events:
            if e.origin_id not in seen:
                seen.add(e.origin_id)
                fresh.append(e)
        if fresh:
            n = len(fresh)
            cur = await conn.execute(
                sql.SQL(
                    "WITH c AS (UPDATE event_log SET last_sequence = last_sequence + %s"
                    "   WHERE id = 1 RETURNING last_sequence - %s AS base)"
                    " INSERT INTO events (sequence, type, workspace, kind, resource_id, data,"
                    "   actor, origin, peer, origin_id, origin_time)"
                    " SELECT c.base + u.ord, u.type, u.ws, u.kind, u.rid, u.data::jsonb,"
                    "   u.actor, %s, %s, u.oid::uuid, u.otime::timestamptz"
                    " FROM c CROSS JOIN unnest(%s::text[], %s::text[], %s::text[],"
                    "   %s::text[], %s::text[], %s::text[], %s::text[], %s::text[])"
                    "   WITH ORDINALITY AS u(type, ws, kind, rid, data, actor, oid, otime, ord)"
                    " RETURNING {}"
                ).format(_EVENT_COLUMNS),
                (n, n, origin, peer,
                 [e.type for e in fresh], [e.workspace for e in fresh],
                 [e.kind for e in fresh], [e.resource_id for e in fresh],
                 [json.dumps(e.data) for e in fresh], [e.actor for e in fresh],
                 [str(e.origin_id) for e in fresh],
                 [e.origin_time.isoformat() if e.origin_time else None for e in fresh]),
            )
            rows = await cur.fetchall()
            last = max(int(_get(r, "sequence", 0)) for r in rows)
            await conn.execute("SELECT pg_notify(%s, %s)", (EVENTS_CHANNEL, str(last)))
        last_time = max((e.origin_time for e in events if e.origin_time), default=None)
        await conn.execute(
            "UPDATE peer_follows SET cursor = %s, received = received + %s,"
            " duplicates = duplicates + %s,"
            " last_event_time = coalesce(%s, last_event_time),"
            " last_received_at = CASE WHEN %s > 0 THEN now() ELSE last_received_at END,"
            " state = 'connected', last_error = '', updated_at = now() WHERE peer = %s",
            (cursor, len(fresh), len(events) - len(fresh), last_time, len(events), peer))
    return len(fresh), len(events) - len(fresh)


def _get(row: Any, key: str, index: int) -> Any:
    """A column of a row from a dict_row or a tuple cursor."""
    return row[key] if isinstance(row, dict) else row[index]


class FollowStore:
    """Follow settings and state, and forgetting a peer's events."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def follow(self, peer: str, patterns: Sequence[str]) -> Follow:
        """Switch following on (keeping the cursor of an earlier follow), with patterns."""
        async with effect_transaction(self.pool) as conn:
            cur = await conn.execute(
                "INSERT INTO peer_follows (peer, type_patterns) VALUES (%s, %s)"
                " ON CONFLICT (peer) DO UPDATE SET enabled = true,"
                "   type_patterns = EXCLUDED.type_patterns,"
                "   state = CASE WHEN peer_follows.enabled THEN peer_follows.state"
                "     ELSE 'starting' END, updated_at = now()"
                " RETURNING *", (peer, list(patterns)))
            row = await cur.fetchone()
        assert row is not None
        return _row_to_follow(row)

    async def unfollow(self, peer: str) -> Follow:
        """Switch following off; the cursor is kept, so a later follow resumes."""
        async with effect_transaction(self.pool) as conn:
            cur = await conn.execute(
                "UPDATE peer_follows SET enabled = false, state = 'stopped', updated_at = now()"
                " WHERE peer = %s RETURNING *", (peer,))
            row = await cur.fetchone()
            if row is None:
                raise NotFound(f"peer {peer!r} is not followed")
        return _row_to_follow(row)

    async def forget(self, peer: str) -> int:
        """Delete every event received from `peer` and its follow state; how many events.

        Refused while the peer is followed (unfollow first), so no follower stores more of
        its events afterwards: `store_received` locks the same row and finds it gone.
        """
        async with effect_transaction(self.pool) as conn:
            cur = await conn.execute(
                "SELECT enabled FROM peer_follows WHERE peer = %s FOR UPDATE", (peer,))
            row = await cur.fetchone()
            if row is not None and row["enabled"]:
                raise FailedPrecondition(
                    f"peer {peer!r} is followed; run `tessera peers unfollow {peer}` first",
                    reason="PEER_FOLLOWED")
            cur = await conn.execute(
                "WITH d AS (DELETE FROM events WHERE peer = %s RETURNING 1)"
                " SELECT count(*) AS n FROM d", (peer,))
            counted = await cur.fetchone()
            await conn.execute("DELETE FROM peer_follows WHERE peer = %s", (peer,))
        return int(counted["n"]) if counted else 0

    async def get(self, peer: str) -> Follow | None:
        """One peer's follow row, if any."""
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT * FROM peer_follows WHERE peer = %s", (peer,))
            row = await cur.fetchone()
        return _row_to_follow(row) if row else None

    async def list(self) -> list[Follow]:
        """Every follow row (on and off), by peer name."""
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT * FROM peer_follows ORDER BY peer")
            rows = await cur.fetchall()
        return [_row_to_follow(r) for r in rows]

    async def set_state(self, peer: str, state: str, error: str = "", *,
                        conn: psycopg.AsyncConnection[Any] | None = None) -> None:
        """Record the follower's state and last error (secret-free text), on `conn` if
        given (the follower's own, lock-holding connection)."""
        query = ("UPDATE peer_follows SET state = %s,"
                 " last_error = CASE WHEN %s <> '' THEN %s ELSE last_error END,"
                 " updated_at = now() WHERE peer = %s AND enabled")
        params = (state, error, error[:500], peer)
        if conn is not None:
            await conn.execute(query, params)
            return
        async with self.pool.connection() as pooled:
            await pooled.execute(query, params)
