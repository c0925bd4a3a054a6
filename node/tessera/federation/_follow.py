"""Following peers: a durable subscription on each followed peer, stored in our own log.

One `Followers` per serving process. It reads which joined peers are followed
(`peer_follows`) at start, when told (a follow change through this process) and every
`events.follow_poll_s`, and runs one task per followed peer. A task:

1. opens its own PostgreSQL connection and takes the peer's session advisory lock on it
   (`pg_try_advisory_lock`): exactly one follower per peer across every serving process
   of the node. Without the lock it waits in "standby" and tries again. Every write of
   the follower goes through that same connection, so a follower whose connection (and
   so its lock) is gone cannot write either.
2. opens a durable Subscribe stream on the peer over the peer's mTLS channel (the client
   certificate this node holds on it), resuming after the cursor stored here: the peer's
   cursor after the last event whose local insert committed.
3. stores what arrives in batches (`store_received`: one transaction inserts the events,
   dropping any already stored by (peer, origin id), and writes the new cursor), and only
   after that commit acks the cursor on the peer. A crash between the two re-delivers a
   batch, which the duplicate check drops.
4. on any error (peer down, network, stream ended) records the error, waits a jittered,
   doubling, bounded backoff and starts again from 1; a connected stream resets it.

Events stored here carry `peer` = the followed peer's local name and `origin` = its
SPIFFE id. They are served to local identities only: every read for a peer selects from
`events_shareable` (see tessera.store).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import random
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psycopg
from google.protobuf import json_format
from prometheus_client import CollectorRegistry, Counter, Gauge
from psycopg.rows import dict_row

from tessera.core.errors import FailedPrecondition, TesseraError
from tessera.peering import load_outbound
from tessera.store import (
    Follow,
    FollowStopped,
    FollowStore,
    ReceivedEvent,
    redact_dsn,
    store_received,
)
from tessera_client import AsyncClient
from tessera_client.pb import events_pb2

log = logging.getLogger(__name__)

#: The durable subscription's name on every followed peer (one per follower identity).
SUBSCRIPTION = "tessera.follow"
#: Initial-metadata header a peer sends once the stream's subscription is in place.
OPEN_HEADER = "tessera-stream-open"
#: Most events stored in one transaction.
BATCH = 500
#: Events read ahead of the store (a bounded queue: the peer's stream is held back by gRPC
#: flow control when the store is slower).
READ_AHEAD = 2000
#: Envelope bytes read ahead of the store at most (with READ_AHEAD: a followed peer cannot
#: make the follower hold more than this many bytes of its events in memory).
READ_AHEAD_BYTES = 16 << 20
#: This node's own publish limit when none is given (events.max_payload_bytes' default).
DEFAULT_MAX_PAYLOAD = 64 * 1024
_BACKOFF_START_S = 0.5
_ACK_TIMEOUT_S = 10.0
#: What a received event must look like (the peer is another party: checked, not trusted).
_TYPE_RE = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)+$")
_MAX_TYPE = 128
_MAX_FIELD = 256
#: Longest cursor accepted from a peer (a Tessera cursor is well under 100 characters).
_MAX_CURSOR = 512
#: A Struct's wire bytes per byte of its JSON, at most (see received_of).
_WIRE_PER_JSON = 6
#: Envelope bytes besides those fields (tags, lengths, id, sequence, time, source).
_ENVELOPE_SLACK = 1024


def lock_key(peer: str) -> int:
    """A signed 64-bit advisory-lock key for following `peer`."""
    digest = hashlib.sha256(f"tessera-follow\0{peer}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def backoff_s(attempt: int, max_s: float, rng: random.Random | None = None) -> float:
    """The wait before reconnection attempt `attempt` (0-based): doubling from 0.5 s, at
    most `max_s`, jittered to between half and all of it (so followers spread out)."""
    ceiling = min(max_s, _BACKOFF_START_S * (2 ** min(attempt, 30)))
    return (rng or random).uniform(ceiling / 2, ceiling)


class _Standby(Exception):
    """Another serving process holds the peer's follow lock."""


def _json_problem(value: Any) -> bool:
    """Whether a payload cannot be stored as jsonb (NUL characters, NaN, infinities): a
    batch holding one would fail on every retry and stall the follow for good."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_json_problem(k) or _json_problem(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_json_problem(v) for v in value)
    return False


def received_of(msg: events_pb2.EventEnvelope,
                max_payload: int = DEFAULT_MAX_PAYLOAD) -> ReceivedEvent | None:
    """A delivered envelope as an event to store, or None if it is malformed or bigger than
    this node's own publish limit (`max_payload` bytes of JSON data): a followed peer is
    held to what this node's own API accepts, so it cannot fill this node's disk."""
    if not _TYPE_RE.match(msg.type) or len(msg.type) > _MAX_TYPE:
        return None
    # Refused early, before converting, when even the densest encoding could not fit: a
    # Struct takes at most _WIRE_PER_JSON times the bytes of its JSON (a list of one-digit
    # numbers: 2 JSON bytes, 11 on the wire); the exact JSON size is checked below.
    if msg.data.ByteSize() > _WIRE_PER_JSON * max_payload:
        return None
    try:
        origin_id = uuid.UUID(msg.id)
    except ValueError:
        return None
    subject = msg.subject
    if any(len(v) > _MAX_FIELD or "\x00" in v
           for v in (subject.workspace, subject.kind, subject.id, msg.actor)):
        return None
    try:
        data = json_format.MessageToDict(msg.data) if msg.HasField("data") else {}
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or _json_problem(data):
        return None
    if len(json.dumps(data, separators=(",", ":"))) > max_payload:
        return None
    try:
        when = msg.time.ToDatetime(tzinfo=UTC) if msg.HasField("time") else None
    except (ValueError, OverflowError):  # out of datetime's range: would fail every retry
        return None
    return ReceivedEvent(origin_id=origin_id, type=msg.type, workspace=subject.workspace,
                         kind=subject.kind, resource_id=subject.id, data=data,
                         actor=msg.actor, origin_time=when)


def _plain(text: str) -> str:
    """The peer's text without control or format characters (it lands in logs, `peers
    list` and doctor): each shown escaped."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                   for ch in text)


def describe(exc: BaseException) -> str:
    """A secret-free, short description of why following failed."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {_plain((exc.details() or '')[:300])}"
    if isinstance(exc, TesseraError):
        return f"{exc.reason}: {str(exc)[:300]}"
    if isinstance(exc, psycopg.Error):
        return f"database: {type(exc).__name__}"
    return type(exc).__name__


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.connected = Gauge(
            "tessera_follow_connected",
            "1 while this process follows the peer over an open stream.", ["peer"],
            registry=registry)
        self.received = Counter(
            "tessera_follow_events_total", "Events stored from a followed peer.", ["peer"],
            registry=registry)
        self.duplicates = Counter(
            "tessera_follow_duplicates_total",
            "Events a followed peer delivered again and that were dropped.", ["peer"],
            registry=registry)
        self.malformed = Counter(
            "tessera_follow_malformed_total",
            "Events from a followed peer dropped as malformed.", ["peer"], registry=registry)
        self.standby = Gauge(
            "tessera_follow_standby",
            "1 while another serving process of this node holds the peer's follow lock.",
            ["peer"], registry=registry)
        self.errors = Counter(
            "tessera_follow_errors_total",
            "Follow sessions that ended in an error (each followed by a backoff).", ["peer"],
            registry=registry)
        self.lag = Gauge(
            "tessera_follow_lag_seconds",
            "Seconds between the newest stored event's origin time and its storing here.",
            ["peer"], registry=registry)
        self.last_received = Gauge(
            "tessera_follow_last_received_timestamp_seconds",
            "When this process last stored an event from the peer (Unix time).", ["peer"],
            registry=registry)


@dataclass
class _Task:
    patterns: tuple[str, ...]
    task: asyncio.Task[None]
    state: str = "starting"
    last_error: str = ""
    #: Set when a session's stream opened (the backoff starts again after it fails).
    connected: bool = False


class Followers:
    """Runs this process's followers (see the module docstring)."""

    def __init__(self, *, data_dir: Path, dsn: str, store: FollowStore,
                 backoff_max_s: float = 10.0, poll_s: float = 2.0,
                 registry: CollectorRegistry | None = None,
                 max_payload_bytes: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.data_dir = data_dir
        self.max_payload_bytes = max_payload_bytes
        self.dsn = dsn
        self.store = store
        self.backoff_max_s = backoff_max_s
        self.poll_s = poll_s
        self.tasks: dict[str, _Task] = {}
        self.metrics = _Metrics(registry or CollectorRegistry())
        self._poke = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start following what is followed (in the background)."""
        self._loop = asyncio.create_task(self._reconcile_loop(), name="tessera-follow")

    async def close(self) -> None:
        """Stop every follower (their locks go with their connections)."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None
        for name in list(self.tasks):
            await self._stop(name)

    def poke(self) -> None:
        """Re-read the follow settings now (after a change through this process)."""
        self._poke.set()

    def local_state(self, peer: str) -> str | None:
        """This process's view of a follower: its state, or None if it runs none."""
        t = self.tasks.get(peer)
        return t.state if t is not None else None

    # -- reconciliation -------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        while True:
            self._poke.clear()
            try:
                await self.reconcile(await self.store.list())
            except (psycopg.Error, OSError, TesseraError) as exc:
                log.warning("cannot read the followed peers (%s); retrying",
                            type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self.poll_s)

    async def reconcile(self, follows: Sequence[Follow]) -> None:
        """Run a task per enabled follow; stop the rest; restart on changed patterns."""
        wanted = {f.peer: tuple(f.type_patterns) for f in follows if f.enabled}
        for name, t in list(self.tasks.items()):
            if wanted.get(name) != t.patterns or t.task.done():
                await self._stop(name)
        for name, patterns in wanted.items():
            if name not in self.tasks:
                task = asyncio.create_task(self._follow(name, patterns),
                                           name=f"tessera-follow-{name}")
                self.tasks[name] = _Task(patterns, task)

    async def _stop(self, name: str) -> None:
        t = self.tasks.pop(name, None)
        if t is None:
            return
        t.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t.task
        self.metrics.connected.labels(name).set(0)
        self.metrics.standby.labels(name).set(0)

    # -- one peer -------------------------------------------------------------------------

    def _local_state(self, name: str, state: str, error: str = "") -> None:
        t = self.tasks.get(name)
        if t is not None:
            t.state = state
            if error:
                t.last_error = error
        self.metrics.standby.labels(name).set(1 if state == "standby" else 0)

    async def _set_state(self, name: str, state: str, error: str = "", *,
                         conn: psycopg.AsyncConnection[Any] | None = None) -> None:
        """Record the state locally and in `peer_follows` (only the lock holder calls this,
        so a standby process never overwrites the follower's state)."""
        self._local_state(name, state, error)
        with contextlib.suppress(psycopg.Error, OSError, TesseraError):
            await self.store.set_state(name, state, error, conn=conn)

    async def _follow(self, name: str, patterns: tuple[str, ...]) -> None:
        attempt = 0
        while True:
            t = self.tasks.get(name)
            try:
                await self._session(name, patterns)
                error = "the peer ended the stream"
            except asyncio.CancelledError:
                raise
            except _Standby:
                self._local_state(name, "standby")
                await asyncio.sleep(self.poll_s)
                continue
            except FollowStopped:
                return  # unfollowed or forgotten: the reconciler stops this task
            except Exception as exc:
                error = describe(exc)
            finally:
                self.metrics.connected.labels(name).set(0)
            if t is not None and t.connected:
                attempt = 0  # the session had connected: start the backoff again
                t.connected = False
            self.metrics.errors.labels(name).inc()
            log.warning("following peer %s: %s; reconnecting", name, error)
            self._local_state(name, "backoff", error)
            await asyncio.sleep(backoff_s(attempt, self.backoff_max_s))
            attempt += 1

    async def _session(self, name: str, patterns: tuple[str, ...]) -> None:
        """One connection: lock, subscribe, store and ack until something fails."""
        try:
            conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True,
                                                         row_factory=dict_row)
        except psycopg.Error as exc:
            raise ConnectionError(f"database unreachable at {redact_dsn(self.dsn)}") from exc
        async with conn:
            cur = await conn.execute("SELECT pg_try_advisory_lock(%s) AS got",
                                     (lock_key(name),))
            row = await cur.fetchone()
            if not row or not row["got"]:
                raise _Standby
            try:
                peer = load_outbound(self.data_dir, name)
                follow = await self.store.get(name)
                if follow is None or not follow.enabled:
                    raise FollowStopped(name)
                client = AsyncClient(peer.address, peer.credentials())
                try:
                    await self._stream(conn, client, name, peer.identity, patterns,
                                       follow.cursor)
                finally:
                    await client.close()
            except (asyncio.CancelledError, FollowStopped):
                raise
            except Exception as exc:
                # Recorded while the lock is still held: no other follower runs meanwhile.
                await self._set_state(name, "backoff", describe(exc), conn=conn)
                raise

    async def _stream(self, conn: psycopg.AsyncConnection[Any], client: AsyncClient,
                      name: str, origin: str, patterns: tuple[str, ...], cursor: str) -> None:
        request = events_pb2.SubscribeRequest(
            type_patterns=list(patterns) or ["*"], subscription=SUBSCRIPTION,
            max_batch=BATCH)
        if cursor:
            # Resume after what was stored here, whatever the peer last got acked.
            request.start = events_pb2.START_POSITION_CURSOR
            request.cursor = cursor
        else:
            # A fresh follow (never followed, or forgotten) starts at the peer's now, not at
            # what an earlier follow left acked there: drop that subscription first.
            request.start = events_pb2.START_POSITION_NOW
            try:
                await client.events.DeleteSubscription(
                    events_pb2.DeleteSubscriptionRequest(subscription=SUBSCRIPTION),
                    timeout=_ACK_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
        call = client.events.Subscribe(request)
        queue: asyncio.Queue[events_pb2.EventEnvelope | BaseException] = asyncio.Queue(
            READ_AHEAD)
        buffered = [0]  # envelope bytes in the queue
        drained = asyncio.Event()
        # The largest envelope received_of could accept (payload, fields, type, cursor).
        limit = (_WIRE_PER_JSON * self.max_payload_bytes + 4 * _MAX_FIELD + _MAX_TYPE + _MAX_CURSOR
                 + _ENVELOPE_SLACK)

        async def reader() -> None:
            try:
                async for msg in call:
                    for one in (msg.batch if len(msg.batch) else (msg,)):
                        if one.ByteSize() > limit:
                            # Refused anyway (received_of): only its cursor is kept, or
                            # one that ends the session if that is oversized too.
                            keep = one.cursor if len(one.cursor) <= _MAX_CURSOR else "\n"
                            one = events_pb2.EventEnvelope(cursor=keep)  # no type: malformed
                        size = one.ByteSize()
                        while buffered[0] and buffered[0] + size > READ_AHEAD_BYTES:
                            drained.clear()
                            await drained.wait()
                        buffered[0] += size
                        await queue.put(one)
                await queue.put(EOFError("the peer ended the stream"))
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                await queue.put(exc)

        reading = asyncio.create_task(reader())
        try:
            md = await call.initial_metadata()
            if any(k == OPEN_HEADER for k, _ in (md or ())):
                t = self.tasks.get(name)
                if t is not None:
                    t.connected = True
                self.metrics.connected.labels(name).set(1)
                await self._set_state(name, "connected", conn=conn)
            while True:
                item = await queue.get()
                batch: list[events_pb2.EventEnvelope] = []
                failure: BaseException | None = None
                while True:
                    if isinstance(item, BaseException):
                        failure = item
                        break
                    buffered[0] -= item.ByteSize()
                    drained.set()
                    batch.append(item)
                    if len(batch) >= BATCH or queue.empty():
                        break
                    item = queue.get_nowait()
                if batch:
                    await self._store_batch(conn, client, name, origin, batch)
                if failure is not None:
                    raise failure
        finally:
            reading.cancel()
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading

    async def _store_batch(self, conn: psycopg.AsyncConnection[Any], client: AsyncClient,
                           name: str, origin: str,
                           batch: list[events_pb2.EventEnvelope]) -> None:
        events: list[ReceivedEvent] = []
        for msg in batch:
            if msg.heartbeat:
                continue
            e = received_of(msg, self.max_payload_bytes)
            if e is None:
                self.metrics.malformed.labels(name).inc()
                log.warning("dropping a malformed event from peer %s", name)
                continue
            events.append(e)
        cursor = batch[-1].cursor
        if not cursor:
            return
        if len(cursor) > _MAX_CURSOR or not cursor.isprintable():
            # Stored and shown here, and sent back to the peer: not whatever it likes.
            raise FailedPrecondition("the peer sent a malformed cursor",
                                     reason="PEER_MALFORMED_CURSOR")
        stored, dups = await store_received(conn, peer=name, origin=origin, events=events,
                                            cursor=cursor)
        now = time.time()
        if stored:
            self.metrics.received.labels(name).inc(stored)
            self.metrics.last_received.labels(name).set(now)
            newest = max((e.origin_time for e in events if e.origin_time), default=None)
            if newest is not None:
                self.metrics.lag.labels(name).set(
                    max(0.0, (datetime.now(UTC) - newest).total_seconds()))
        if dups:
            self.metrics.duplicates.labels(name).inc(dups)
        # Only now, with the events committed here, may the peer forget them.
        await client.events.Ack(events_pb2.AckRequest(subscription=SUBSCRIPTION,
                                                      cursor=cursor),
                                timeout=_ACK_TIMEOUT_S)
