"""One per process: wakes open streams, ends revoked ones, holds durable-stream locks, prunes.

- One connection LISTENs on the events, grants and revocations channels. A new event wakes
  every open stream, which then reads the table itself (the payload is only a hint). A
  grant or peer change makes that peer's streams re-check their admission; a revoked
  serial ends the streams of that certificate. Every replica listens, so every replica's
  streams react. After a lost connection every stream is woken and every peer stream
  re-checked, since notifications sent meanwhile are lost.
- A second connection holds a session advisory lock per open durable subscription: one
  open stream per subscription across replicas, released by PostgreSQL the moment a
  process dies.
- A task prunes the log by the configured retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge

from tessera.calls import Caller
from tessera.config import EventsConfig
from tessera.core.errors import PermissionDenied, ResourceExhausted, TesseraError, Unavailable
from tessera.grants import GRANTS_CHANNEL
from tessera.pki import REVOCATIONS_CHANNEL
from tessera.store import EVENTS_CHANNEL, EventStore

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 10.0
#: Seconds a stream told to end may take before its task is cancelled.
END_GRACE_S = 1.0


@dataclass(eq=False)
class StreamHandle:
    """One open Subscribe stream, as the hub sees it."""

    caller: Caller
    #: Set when new events may be there, or when the stream must end.
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: Why the stream must end (raised by the stream at its next step), or None.
    ended: TesseraError | None = None
    #: The position delivered or scanned so far, for the lag metric.
    position: int = 0
    #: Set by the hub when the peer's admission must be checked again.
    recheck: bool = False
    #: The durable subscription's lock key, if any.
    lock_key: int | None = None
    #: The RPC's task, cancelled if the stream cannot take its next step (see `end`).
    task: asyncio.Task[Any] | None = None
    #: Set once the stream has ended and left the hub.
    closed: bool = False
    #: The delivered-events counter of its caller kind (cached: one lookup per stream).
    delivered_counter: Any = None

    def end(self, exc: TesseraError) -> None:
        """Make the stream end with `exc` at its next step.

        A stream whose consumer stopped reading is parked in gRPC's flow control and takes
        no next step: if it has not ended `END_GRACE_S` later, its task is cancelled, so a
        revoked caller cannot hold the stream (and its page of events) open by not reading.
        """
        first = self.ended is None
        if first:
            self.ended = exc
        self.wake.set()
        if first and self.task is not None:
            asyncio.get_running_loop().call_later(END_GRACE_S, self._reap)

    def _reap(self) -> None:
        if not self.closed and self.task is not None and not self.task.done():
            log.info("cancelling a stream of %s that did not end after %s (its consumer is "
                     "not reading)", self.caller.uri, self.ended.reason if self.ended else "")
            self.task.cancel()


def lock_key(caller: str, name: str) -> int:
    """A signed 64-bit advisory-lock key for (caller, subscription name)."""
    digest = hashlib.sha256(f"tessera-sub\0{caller}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class _Metrics:
    def __init__(self, registry: CollectorRegistry, hub: EventHub) -> None:
        self.streams = Gauge(
            "tessera_event_streams", "Open Subscribe streams, by caller (local, peer).",
            ["caller"], registry=registry)
        self.delivered = Counter(
            "tessera_events_delivered_total", "Events delivered to streams, by caller.",
            ["caller"], registry=registry)
        self.published = Counter(
            "tessera_events_published_total", "Application events appended by Publish.",
            registry=registry)
        self.head = Gauge(
            "tessera_event_log_head", "Highest event sequence this process has seen.",
            registry=registry)
        self.head.set_function(lambda: hub.head)
        self.lag = Gauge(
            "tessera_event_stream_max_lag_events",
            "Largest number of events any open stream is behind the log head.",
            registry=registry)
        self.lag.set_function(hub.max_lag)
        self.listening = Gauge(
            "tessera_event_listener_up",
            "1 while this process LISTENs for new events (else streams poll every second).",
            registry=registry)
        self.pruned = Counter(
            "tessera_events_pruned_total", "Events deleted by retention.", registry=registry)


class EventHub:
    """Wakes, re-checks and ends the streams of one process (see the module docstring)."""

    def __init__(self, dsn: str, store: EventStore, cfg: EventsConfig, *,
                 registry: CollectorRegistry | None = None) -> None:
        self.dsn = dsn
        self.store = store
        self.cfg = cfg
        self.streams: set[StreamHandle] = set()
        self.head = 0
        self.listening = False
        self.closed = False
        self._tasks: list[asyncio.Task[None]] = []
        self._lock_conn: psycopg.AsyncConnection[Any] | None = None
        self._lock_mutex = asyncio.Lock()
        self._held: set[int] = set()
        self._unlocks: set[asyncio.Task[None]] = set()
        #: Re-checks a peer's admission, raising TesseraError if it no longer holds (set by
        #: the event service). Run by the hub itself on a grant change, so a stream parked
        #: at a yield (its consumer not reading) ends too, not only at its next loop step.
        self.checker: Callable[[Caller], Awaitable[None]] | None = None
        self._checks: set[asyncio.Task[None]] = set()
        self.metrics = _Metrics(registry or CollectorRegistry(), self)
        #: False while another process of the node prunes the log.
        self.prune_here: Callable[[], bool] = lambda: True
        self._listening_once = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self, *, wait_s: float = 5.0) -> None:
        """Start listening and pruning; waits briefly for the first LISTEN to be in place."""
        with contextlib.suppress(TesseraError, psycopg.Error, OSError):
            self.head = (await self.store.state()).head
        self._tasks = [asyncio.create_task(self._listener(), name="tessera-events-listen"),
                       asyncio.create_task(self._pruner(), name="tessera-events-prune"),
                       asyncio.create_task(self._lock_keeper(), name="tessera-events-locks")]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening_once.wait(), wait_s)

    async def close(self) -> None:
        """End every stream (UNAVAILABLE), stop the tasks, close the connections."""
        self.closed = True
        for handle in list(self.streams):
            handle.end(Unavailable("the node is shutting down; reconnect to resume"))
        for task in [*self._tasks, *self._checks]:
            task.cancel()
        for task in [*self._tasks, *self._checks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._lock_conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await self._lock_conn.close()
            self._lock_conn = None

    # -- streams ------------------------------------------------------------------------

    def register(self, caller: Caller) -> StreamHandle:
        """Track a new stream; Unavailable once the hub is closing, ResourceExhausted
        beyond the caller's open streams (each may hold a page of events in memory)."""
        if self.closed:
            raise Unavailable("the node is shutting down; reconnect to another replica")
        cap = self.cfg.max_streams_per_caller
        if sum(1 for h in self.streams if h.caller.uri == caller.uri) >= cap:
            raise ResourceExhausted(
                f"this caller already has {cap} open streams on this node, the most "
                "allowed (events.max_streams_per_caller); close one first",
                retry_after_s=1.0, subject=caller.uri)
        handle = StreamHandle(caller, position=self.head, task=asyncio.current_task())
        self.streams.add(handle)
        self.metrics.streams.labels(_who(caller)).inc()
        return handle

    def unregister(self, handle: StreamHandle) -> None:
        """Forget a stream that ended."""
        handle.closed = True
        if handle in self.streams:
            self.streams.discard(handle)
            self.metrics.streams.labels(_who(handle.caller)).dec()

    def delivered(self, handle: StreamHandle) -> None:
        """Count one delivered event (the labelled child looked up once per stream)."""
        if handle.delivered_counter is None:
            handle.delivered_counter = self.metrics.delivered.labels(_who(handle.caller))
        handle.delivered_counter.inc()

    def max_lag(self) -> float:
        """Events the furthest-behind open stream has yet to scan."""
        return float(max((max(0, self.head - h.position) for h in self.streams), default=0))

    def poll_s(self) -> float | None:
        """How often streams must poll: never while listening, else every second."""
        return None if self.listening else 1.0

    # -- durable-subscription locks -------------------------------------------------------

    async def try_lock(self, key: int) -> bool:
        """Take the cross-replica lock of a durable subscription; False if it is held."""
        async with self._lock_mutex:
            if key in self._held:
                return False
            try:
                if self._lock_conn is None or self._lock_conn.closed:
                    self._lost_locks()
                    self._lock_conn = await psycopg.AsyncConnection.connect(
                        self.dsn, autocommit=True)
                cur = await self._lock_conn.execute("SELECT pg_try_advisory_lock(%s)", (key,))
                row = await cur.fetchone()
            except (psycopg.Error, OSError) as exc:
                self._lost_locks()
                raise Unavailable(f"cannot lock the durable subscription "
                                  f"({type(exc).__name__}); retry") from None
            if not row or not row[0]:
                return False
            self._held.add(key)
            return True

    def release(self, key: int) -> None:
        """Release a durable subscription's lock (in the background: callers may be
        cancelled tasks)."""
        if key in self._held:
            task = asyncio.get_running_loop().create_task(self.unlock(key))
            self._unlocks.add(task)
            task.add_done_callback(self._unlocks.discard)

    async def unlock(self, key: int) -> None:
        """Release a durable subscription's lock now."""
        async with self._lock_mutex:
            if key not in self._held:
                return
            self._held.discard(key)
            conn = self._lock_conn
            if conn is None or conn.closed:
                return
            try:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
            except (psycopg.Error, OSError):
                self._lost_locks()

    async def _lock_keeper(self, interval_s: float = 5.0) -> None:
        """Notice a dropped lock connection even while no stream opens or closes: its
        locks are gone, so another replica could open the same subscriptions."""
        while True:
            await asyncio.sleep(interval_s)
            async with self._lock_mutex:
                conn = self._lock_conn
                if conn is None or not self._held:
                    continue
                try:
                    await conn.execute("SELECT 1")
                except (psycopg.Error, OSError):
                    with contextlib.suppress(psycopg.Error, OSError):
                        await conn.close()
                    self._lost_locks()

    def _lost_locks(self) -> None:
        """The lock connection is gone, so are its locks: end the streams that held one."""
        if self._lock_conn is not None and not self._lock_conn.closed:
            return
        self._lock_conn = None
        held, self._held = self._held, set()
        for handle in list(self.streams):
            if handle.lock_key is not None and handle.lock_key in held:
                handle.end(Unavailable("lost the durable subscription's lock; reconnect"))

    # -- signals --------------------------------------------------------------------------

    def _wake_all(self, *, recheck: bool = False) -> None:
        for handle in list(self.streams):
            if recheck and handle.caller.peer:
                self._recheck(handle)
            handle.wake.set()

    def _recheck(self, handle: StreamHandle) -> None:
        """Make a peer stream re-check its admission, and check it here too: a stream
        mid-page or parked in flow control takes no loop step, so it would go on delivering
        the page it read under the old grant."""
        handle.recheck = True
        handle.wake.set()
        if self.checker is None:
            return
        task = asyncio.get_running_loop().create_task(self._check_handle(handle, self.checker))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    @staticmethod
    async def _check_handle(handle: StreamHandle,
                            checker: Callable[[Caller], Awaitable[None]]) -> None:
        try:
            await checker(handle.caller)
        except TesseraError as exc:
            handle.end(exc)

    def on_events(self, payload: str) -> None:
        """New events were committed: wake every stream."""
        with contextlib.suppress(ValueError):
            self.head = max(self.head, int(payload))
        self._wake_all()

    def on_grant_change(self, peer: str) -> None:
        """A peer's grant or state changed: its streams re-check their admission now."""
        for handle in list(self.streams):
            if handle.caller.peer == peer:
                self._recheck(handle)

    def on_revoked_serial(self, payload: str, denied: Callable[[int], None]) -> None:
        """A certificate serial was revoked: the streams it opened end."""
        try:
            serial = int(payload, 16)
        except ValueError:
            self._wake_all(recheck=True)
            return
        denied(serial)

    def end_serial(self, serial: int, exc: TesseraError) -> None:
        """End every stream opened with this certificate serial."""
        for handle in list(self.streams):
            if handle.caller.serial == serial:
                handle.end(exc)

    async def _listener(self) -> None:
        def deny(serial: int) -> None:
            self.end_serial(serial, PermissionDenied(
                "the client certificate was revoked", reason="CERT_REVOKED"))

        backoff = 0.5
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                        self.dsn, autocommit=True) as conn:
                    for channel in (EVENTS_CHANNEL, GRANTS_CHANNEL, REVOCATIONS_CHANNEL):
                        await conn.execute(f"LISTEN {channel}")
                    self.listening = True
                    self.metrics.listening.set(1)
                    self._listening_once.set()
                    backoff = 0.5
                    # What was announced while we were not listening is lost: every stream
                    # reads again and every peer stream re-checks its grant.
                    self._wake_all(recheck=True)
                    async for note in conn.notifies():
                        if note.channel == EVENTS_CHANNEL:
                            self.on_events(note.payload)
                        elif note.channel == GRANTS_CHANNEL:
                            self.on_grant_change(note.payload)
                        elif note.channel == REVOCATIONS_CHANNEL:
                            self.on_revoked_serial(note.payload, deny)
            except (psycopg.Error, OSError) as exc:
                log.warning("LISTEN for events lost (%s); streams poll until it is back",
                            type(exc).__name__)
            self.listening = False
            self.metrics.listening.set(0)
            self._wake_all()
            await asyncio.sleep(backoff)
            backoff = min(_MAX_BACKOFF_S, backoff * 2)

    async def _pruner(self) -> None:
        cfg = self.cfg
        if not cfg.retention_max_age_s and not cfg.retention_max_count:
            return
        while True:
            started = time.monotonic()
            if not self.prune_here():  # another process of the node prunes
                await asyncio.sleep(cfg.prune_interval_s)
                continue
            try:
                n = await self.store.prune(max_age_s=cfg.retention_max_age_s,
                                           max_count=cfg.retention_max_count)
                if n:
                    self.metrics.pruned.inc(n)
                    log.info("pruned %d events beyond retention", n)
                    self._wake_all()  # lagging streams must learn they fell behind
            except (psycopg.Error, OSError, TesseraError) as exc:
                log.warning("event pruning failed (%s); retrying", type(exc).__name__)
            await asyncio.sleep(max(0.0, cfg.prune_interval_s - (time.monotonic() - started)))


def _who(caller: Caller) -> str:
    return "peer" if caller.peer else "local"

