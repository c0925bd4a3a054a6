"""The event service layer: publish, subscribe (ephemeral or durable), ack.

Delivery is at-least-once and in sequence order: a stream reads the table after its
position, in pages of `stream_buffer` events (its whole buffer), and yields them one by
one; gRPC flow control holds a slow consumer's stream at its current yield, so memory per
stream stays one page whatever the consumer does. A durable subscription resumes after its
last acknowledged event, so anything delivered but not acknowledged is delivered again.

A peer's stream carries only events of a type its grant lists, with a subject whose
recorded workspace, kind, team and owner its scope may read: the grant's own SQL
predicate (`Scope.predicate()`) evaluated over the event's recorded columns.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Container, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
import psycopg_pool

from tessera.calls import Caller
from tessera.config import EventsConfig
from tessera.core.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    Unavailable,
)
from tessera.events import _cursor
from tessera.events._hub import EventHub, StreamHandle, lock_key
from tessera.events._patterns import like_of, pattern_problem
from tessera.grants import GrantStore, PeerState, Scope
from tessera.store import EventStore, NewEvent, Page, StoredEvent, Subscription

#: Seconds a stream keeps retrying a failed read before it ends with UNAVAILABLE.
READ_RETRY_S = 10.0
#: Most sequences one read of a stream examines (see EventStore.read).
SCAN_WINDOW = 20_000


class Start:
    """Where a stream starts (mirrors the proto enum)."""

    UNSPECIFIED = "unspecified"
    BEGINNING = "beginning"
    NOW = "now"
    CURSOR = "cursor"


@dataclass(frozen=True)
class SubscribeParams:
    """A validated Subscribe request."""

    patterns: tuple[str, ...]
    start: str
    cursor: str = ""
    name: str = ""
    #: Only events of these origins: "local", followed peers' names, or "*" for every
    #: origin. Empty: "local" only, so a consumer sees a followed peer's events only when
    #: it asks for them (they never pass for this node's own).
    origins: tuple[str, ...] = ()


#: The origin name of this node's own events in an `origins` filter.
LOCAL_ORIGIN = "local"
#: Every origin, in an `origins` filter.
ANY_ORIGIN = "*"


@dataclass(frozen=True)
class Delivery:
    """One step of a stream: an event, or a heartbeat (event None) with its cursor.

    The first step of every stream is `opened`: the subscription is in place (a durable
    one locked and positioned), so the servicer can tell the client before any event.
    """

    event: StoredEvent | None
    cursor: str
    opened: bool = False
    #: True on the last event of what one read returned: what was read together may be
    #: sent together (the stream then waits or reads again).
    last_of_page: bool = False


class EventService:
    """Publishes, streams and acknowledges events (see the module docstring)."""

    def __init__(self, store: EventStore, hub: EventHub, grants: GrantStore,
                 cfg: EventsConfig, *, denied_serials: Container[int] = frozenset()) -> None:
        self.store = store
        self.hub = hub
        self.grants = grants
        self.cfg = cfg
        self.denied_serials = denied_serials
        self._log_id: uuid.UUID | None = None
        hub.checker = self._recheck

    async def log_id(self) -> uuid.UUID:
        """The id of this node's log (fixed once the schema exists)."""
        if self._log_id is None:
            self._log_id = (await self.store.state()).log_id
        return self._log_id

    async def cursor_of(self, sequence: int) -> str:
        """The cursor after `sequence`."""
        return _cursor.encode(await self.log_id(), sequence)

    async def _sequence_of(self, field: str, text: str) -> int:
        try:
            return _cursor.decode(text, await self.log_id())
        except _cursor.CursorError as exc:
            raise InvalidArgument([FieldViolation(field, str(exc))]) from None

    # -- publish ------------------------------------------------------------------------

    async def publish(self, caller: Caller, events: Sequence[NewEvent]) -> list[StoredEvent]:
        """Append application events (already validated) as one transaction."""
        stored = await self.store.publish(events, actor=caller.uri)
        self.hub.metrics.published.inc(len(events))
        return stored

    # -- ack ----------------------------------------------------------------------------

    async def ack(self, caller: Caller, name: str, cursor: str) -> str:
        """Move the caller's durable subscription forward to `cursor`; its stored cursor."""
        sequence = await self._sequence_of("cursor", cursor)
        state = await self.store.state()
        if sequence > state.head:
            raise InvalidArgument([FieldViolation("cursor", "is ahead of this node's log")])
        sub = await self.store.ack(caller.uri, name, sequence)
        if sub is None:
            raise NotFound(f"durable subscription {name!r} does not exist")
        return await self.cursor_of(sub.acked_sequence)

    async def delete(self, caller: Caller, name: str) -> None:
        """Delete the caller's durable subscription, unless a stream has it open."""
        key = lock_key(caller.uri, name)
        if not await self.hub.try_lock(key):
            raise FailedPrecondition(
                f"durable subscription {name!r} has an open stream; close it first",
                reason="SUBSCRIPTION_OPEN")
        try:
            if not await self.store.delete_subscription(caller.uri, name):
                raise NotFound(f"durable subscription {name!r} does not exist")
        finally:
            await self.hub.unlock(key)

    # -- subscribe ------------------------------------------------------------------------

    async def _start_position(self, params: SubscribeParams) -> int:
        """Where a new stream or subscription starts (unspecified: now)."""
        state = await self.store.state()
        if params.start == Start.BEGINNING:
            return state.pruned_through
        if params.start == Start.NOW:
            return state.head
        if params.start == Start.CURSOR:
            sequence = await self._sequence_of("cursor", params.cursor)
            if sequence > state.head:
                raise InvalidArgument([FieldViolation("cursor", "is ahead of this node's log")])
            return sequence
        return state.head

    async def _out_of_range(self, position: int, pruned_through: int) -> OutOfRange:
        oldest = await self.cursor_of(pruned_through)
        return OutOfRange(
            f"events after this position were pruned by retention (position {position}, "
            f"oldest available {pruned_through}); resume from the oldest available cursor "
            f"{oldest} or from now", reason="CURSOR_EXPIRED")

    async def _open_durable(self, caller: Caller, params: SubscribeParams
                            ) -> tuple[Subscription, int]:
        """The caller's durable subscription (created or repositioned) and where to start."""
        sub = await self.store.get_subscription(caller.uri, params.name)
        if sub is None:
            position = await self._start_position(params)
            sub = await self.store.create_subscription(
                caller.uri, params.name, params.patterns or ("*",), position,
                max_per_caller=self.cfg.max_subscriptions_per_caller)
            return sub, sub.acked_sequence
        patterns = list(params.patterns) if params.patterns else None
        acked: int | None = None
        if params.start == Start.CURSOR:
            # A cursor names one position: an explicit seek. BEGINNING and NOW only say
            # where a new subscription starts, so a client may resend the same request.
            acked = await self._start_position(params)
        if patterns is not None or acked is not None:
            updated = await self.store.update_subscription(caller.uri, params.name,
                                                           patterns=patterns, acked=acked)
            sub = updated or sub
        return sub, sub.acked_sequence

    async def subscribe(self, caller: Caller, scope: Scope | None,
                        params: SubscribeParams) -> AsyncGenerator[Delivery]:
        """The stream of `caller` (scope None: a local identity, which sees every event)."""
        for i, p in enumerate(params.patterns):
            problem = pattern_problem(p)
            if problem:
                raise InvalidArgument([FieldViolation(f"type_patterns[{i}]", problem)])
        grant_like: list[str] | None = None
        predicate = None
        if caller.peer and scope is None:
            # Fail closed: a peer is only ever served through its grant's scope.
            raise PermissionDenied("a peer stream needs the peer's grant",
                                   reason="GRANT_REQUIRED")
        if scope is not None:
            if not scope.event_types:
                raise PermissionDenied("the grant lists no event types to follow",
                                       reason="EVENT_TYPES_NOT_GRANTED")
            grant_like = sorted(like_of(p) for p in scope.event_types)
            predicate = scope.predicate()
        key: int | None = None
        handle: StreamHandle | None = None
        timer: asyncio.TimerHandle | None = None
        try:
            if params.name:
                key = lock_key(caller.uri, params.name)
                if not await self.hub.try_lock(key):
                    key = None
                    raise FailedPrecondition(
                        f"durable subscription {params.name!r} already has an open stream; "
                        "one stream per durable subscription", reason="SUBSCRIPTION_OPEN")
                sub, position = await self._open_durable(caller, params)
                patterns: Sequence[str] = sub.type_patterns
            else:
                position = await self._start_position(params)
                patterns = params.patterns or ("*",)
            like = sorted(like_of(p) for p in patterns)
            handle = self.hub.register(caller)
            handle.lock_key = key
            handle.position = position
            deadline, why = _deadline(caller)
            if deadline is not None:
                # Ended by the clock too, not only at its next step: a stream parked in
                # flow control takes none, and would hold its page past the expiry.
                delay = max(0.0, (deadline - datetime.now(UTC)).total_seconds())
                timer = asyncio.get_running_loop().call_later(
                    delay, handle.end, _expired(why))
            yield Delivery(None, await self.cursor_of(position), opened=True)
            origins: list[str] | None = (
                None if ANY_ORIGIN in params.origins
                else sorted({"" if o == LOCAL_ORIGIN else o
                             for o in params.origins or (LOCAL_ORIGIN,)}))
            async for item in self._run(handle, scope, position, like, grant_like, predicate,
                                        origins):
                yield item
        finally:
            if timer is not None:
                timer.cancel()
            if handle is not None:
                self.hub.unregister(handle)
            if key is not None:
                self.hub.release(key)

    async def _run(self, handle: StreamHandle, scope: Scope | None, position: int,
                   like: list[str], grant_like: list[str] | None, predicate: Any,
                   origins: list[str] | None = None) -> AsyncIterator[Delivery]:
        caller = handle.caller
        # Whom the read serves decides the relation it reads: a peer only ever this node's
        # own events (store.read selects from events_shareable), whatever its grant says.
        for_peer = bool(caller.peer) or scope is not None
        deadline, deadline_reason = _deadline(caller)
        keepalive = self.cfg.keepalive_s
        last_sent = time.monotonic()
        # A peer's admission is checked again when the hub says so, and at least every
        # `keepalive` seconds whether or not events flow: the fallback for a missed
        # notification (one committed while this stream was being set up, or while LISTEN
        # was down unnoticed). The first step checks it: the stream was set up after the
        # call's admission, and a notification before its registration reached no one.
        last_check = -keepalive

        async def recheck_due() -> None:
            nonlocal last_check
            if handle.recheck or (caller.peer
                                  and time.monotonic() - last_check >= keepalive):
                handle.recheck = False
                last_check = time.monotonic()
                await self._recheck(caller)

        while True:
            self._check(handle, deadline, deadline_reason)
            await recheck_due()
            handle.wake.clear()  # before the read: a wake during it triggers another read
            page = await self._read(after=position, like=like, grant_like=grant_like,
                                    predicate=predicate, for_peer=for_peer, origins=origins)
            if position < page.state.pruned_through:
                raise await self._out_of_range(position, page.state.pruned_through)
            self.hub.head = max(self.hub.head, page.state.head)
            log_id = await self.log_id()
            # A peer's read selects from events_shareable, so none is received; this is a
            # second line, should that relation ever be changed to include them.
            events = ([e for e in page.events if not e.received] if for_peer
                      else page.events)
            last = len(events) - 1
            for i, event in enumerate(events):
                self._check(handle, deadline, deadline_reason)
                await recheck_due()
                yield Delivery(event, _cursor.encode(log_id, event.sequence),
                               last_of_page=i == last)
                self.hub.delivered(handle)
                last_sent = time.monotonic()
            position = page.scanned_through
            handle.position = position
            if len(page.events) >= self.cfg.stream_buffer or position < page.state.head:
                continue  # more to read now: a full page, or the scan window ended early
            idle = time.monotonic() - last_sent
            if idle >= keepalive:
                await recheck_due()
                self._check(handle, deadline, deadline_reason)
                yield Delivery(None, await self.cursor_of(position))
                last_sent = time.monotonic()
                continue
            wait = keepalive - idle
            poll = self.hub.poll_s()
            if poll is not None:
                wait = min(wait, poll)
            if deadline is not None:
                wait = min(wait, max(0.0, (deadline - datetime.now(UTC)).total_seconds()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(handle.wake.wait(), wait)

    async def _read(self, *, after: int, like: list[str], grant_like: list[str] | None,
                    predicate: Any, for_peer: bool, origins: list[str] | None) -> Page:
        """One page, riding out a short database outage; Unavailable after a longer one."""
        delay, waited = 0.1, 0.0
        while True:
            try:
                return await self.store.read(
                    after=after, limit=self.cfg.stream_buffer, like_patterns=like,
                    grant_like_patterns=grant_like, scope=predicate, window=SCAN_WINDOW,
                    for_peer=for_peer, origins=origins)
            except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
                if waited >= READ_RETRY_S:
                    raise Unavailable(f"the event log cannot be read ({type(exc).__name__}); "
                                      "reconnect to resume from your last cursor") from None
            await asyncio.sleep(delay)
            waited += delay
            delay = min(2.0, delay * 2)

    def _check(self, handle: StreamHandle, deadline: datetime | None, why: str) -> None:
        """Raise what ends the stream: a signal from the hub, a revoked or expired cert."""
        if handle.ended is not None:
            raise handle.ended
        if handle.caller.serial in self.denied_serials:
            raise PermissionDenied("the client certificate was revoked", reason="CERT_REVOKED")
        if deadline is not None and datetime.now(UTC) >= deadline:
            raise _expired(why)

    async def _recheck(self, caller: Caller) -> None:
        """A peer's admission, again: its peer state and grant must still be the same."""
        if not caller.peer:
            return
        try:
            found = await self.grants.admission(caller.uri)
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            # Fail closed: a grant that cannot be checked does not keep the stream open.
            raise Unavailable(f"the grant cannot be checked ({type(exc).__name__}); "
                              "reconnect to resume from your last cursor") from None
        peer = found.peer
        if peer is None or peer.state is not PeerState.ACTIVE:
            state = peer.state.value if peer else "gone"
            raise PermissionDenied(f"peer {caller.peer} is {state.lower()}",
                                   reason=f"PEER_{state.upper()}")
        opened = getattr(caller.grant, "name", None)
        if found.grant is None or found.grant.name != opened:
            raise PermissionDenied("the grant this stream was opened under was revoked",
                                   reason="GRANT_REVOKED")
        if not found.grant_live:
            raise PermissionDenied("the grant expired", reason="GRANT_EXPIRED")


def _expired(why: str) -> PermissionDenied:
    what = "certificate" if why == "CERT_EXPIRED" else "grant"
    return PermissionDenied(f"the {what} expired", reason=why)


def _deadline(caller: Caller) -> tuple[datetime | None, str]:
    """When the stream must end on its own: the grant's expiry or the certificate's."""
    candidates: list[tuple[datetime, str]] = []
    expire = getattr(caller.grant, "expire_time", None)
    if isinstance(expire, datetime):
        candidates.append((expire, "GRANT_EXPIRED"))
    if caller.not_after is not None:
        candidates.append((caller.not_after, "CERT_EXPIRED"))
    if not candidates:
        return None, ""
    return min(candidates)

