"""EventService: thin servicer over tessera.events (publish, durable streams, ack)."""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc

from tessera.api._convert import dict_to_struct, struct_to_dict
from tessera.api._query import check_key
from tessera.api._validate import IDEMPOTENCY_RE, Checker
from tessera.calls import current_caller, peer_scope
from tessera.core.pagination import query_hash
from tessera.events import (
    ANY_ORIGIN,
    LOCAL_ORIGIN,
    Delivery,
    EventService,
    Start,
    SubscribeParams,
    type_problem,
)
from tessera.store import NewEvent, StoredEvent
from tessera_client.pb import events_pb2, events_pb2_grpc, resources_pb2

#: Initial-metadata header sent once a stream's subscription is in place.
OPEN_HEADER = "tessera-stream-open"
#: Most type patterns one subscription may name.
MAX_PATTERNS = 32
#: Largest message a default gRPC client receives (a PublishBatch response included).
RESPONSE_LIMIT = 4 << 20
#: Bytes an envelope may add to a published event besides its source and actor (cursor,
#: id, sequence, time, and their tags and lengths): an upper bound.
ENVELOPE_OVERHEAD = 128
#: Durable subscription names: short, printable, no spaces.
SUBSCRIPTION_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: Most events one stream message may carry (SubscribeRequest.max_batch).
MAX_STREAM_BATCH = 1000
#: A batch of events is sent once it holds about this many bytes.
STREAM_BATCH_BYTES = 1 << 20
#: A followed peer's name in an `origins` filter (the peer-name form).
ORIGIN_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?$")
_STARTS = {
    events_pb2.START_POSITION_UNSPECIFIED: Start.UNSPECIFIED,
    events_pb2.START_POSITION_BEGINNING: Start.BEGINNING,
    events_pb2.START_POSITION_NOW: Start.NOW,
    events_pb2.START_POSITION_CURSOR: Start.CURSOR,
}


def envelope(d: Delivery, node: str) -> events_pb2.EventEnvelope:
    """A delivery (event or heartbeat) as the wire message; `node` names this node, the
    origin of events appended without one (operation events)."""
    e = d.event
    if e is None:
        return events_pb2.EventEnvelope(cursor=d.cursor, heartbeat=True)
    # A received event keeps its origin's id and time; its source is the followed peer.
    msg = events_pb2.EventEnvelope(
        sequence=e.sequence, cursor=d.cursor, type=e.type, data=dict_to_struct(e.data),
        source=e.peer or e.origin or node, actor=e.actor,
        id=str(e.origin_id if e.received and e.origin_id else e.id),
    )
    if e.has_subject:
        msg.subject.CopyFrom(resources_pb2.ResourceKey(
            workspace=e.workspace, kind=e.kind, id=e.resource_id))
    msg.time.FromDatetime(e.origin_time if e.received and e.origin_time else e.created_at)
    return msg


def _json_problem(value: Any) -> str | None:
    """Why a payload cannot be stored as JSON (jsonb), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return "holds a NaN or infinite number, which JSON cannot represent"
    if isinstance(value, str) and "\x00" in value:
        return "holds a NUL character (\\u0000), which stored JSON cannot represent"
    if isinstance(value, dict):
        for k, v in value.items():
            problem = _json_problem(k) or _json_problem(v)
            if problem:
                return problem
    if isinstance(value, list):
        for v in value:
            problem = _json_problem(v)
            if problem:
                return problem
    return None


class EventServicer(events_pb2_grpc.EventServiceServicer):
    """Converts protobuf to the event service's types and back."""

    def __init__(self, service: EventService, *, kinds: frozenset[str],
                 max_payload_bytes: int, max_batch: int) -> None:
        self.service = service
        self.node = service.store.origin
        self.kinds = kinds
        self.max_payload_bytes = max_payload_bytes
        self.max_batch = max_batch

    def _new_event(self, c: Checker, field: str, r: events_pb2.PublishRequest) -> NewEvent:
        problem = type_problem(r.type, self.kinds)
        if problem:
            c.fail(f"{field}type", problem)
        if r.idempotency_key:
            c.pattern(f"{field}idempotency_key", r.idempotency_key, IDEMPOTENCY_RE,
                      "1-128 printable ASCII characters without spaces")
        ws = kind = rid = ""
        if r.HasField("subject"):
            k = r.subject
            check_key(c, f"{field}subject", k.workspace, k.kind, k.id, self.kinds)
            ws, kind, rid = k.workspace, k.kind, k.id
        try:
            data = struct_to_dict(r.data)
        except ValueError:  # protobuf refuses NaN and infinities in a Struct's JSON form
            data = {}
            c.fail(f"{field}data", "holds a NaN or infinite number, which JSON cannot "
                                   "represent")
        size = len(json.dumps(data, separators=(",", ":")))
        problem = _json_problem(data)
        if problem:
            c.fail(f"{field}data", problem)
        elif size > self.max_payload_bytes:
            c.fail(f"{field}data", f"is {size} bytes as JSON; at most "
                                   f"{self.max_payload_bytes} are allowed")
        request_hash = query_hash({"type": r.type, "subject": [ws, kind, rid], "data": data})
        return NewEvent(type=r.type, workspace=ws, kind=kind, resource_id=rid, data=data,
                        idempotency_key=r.idempotency_key, request_hash=request_hash)

    async def Publish(
        self, request: events_pb2.PublishRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.PublishResponse:
        c = Checker()
        event = self._new_event(c, "", request)
        c.done()
        stored = await self.service.publish(current_caller(), [event])
        return events_pb2.PublishResponse(event=await self._envelope(stored[0]))

    async def PublishBatch(
        self, request: events_pb2.PublishBatchRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.PublishBatchResponse:
        c = Checker()
        if not request.events:
            c.fail("events", "at least one event is required")
        if len(request.events) > self.max_batch:
            c.fail("events", f"holds {len(request.events)} events; at most "
                             f"{self.max_batch} per batch")
            c.done()
        size = request.ByteSize()
        per_event = ENVELOPE_OVERHEAD + len(self.node) + len(current_caller().uri)
        budget = RESPONSE_LIMIT - per_event * len(request.events)
        if size > budget:
            # The response echoes every event with its cursor, id and actor: refused now,
            # or the batch commits and a default client cannot read the answer.
            c.fail("events", f"is {size} bytes; a batch of {len(request.events)} events may "
                             f"be at most {budget} so that its response fits in 4 MiB")
            c.done()
        events = [self._new_event(c, f"events[{i}].", r) for i, r in enumerate(request.events)]
        c.done()
        stored = await self.service.publish(current_caller(), events)
        return events_pb2.PublishBatchResponse(
            events=[await self._envelope(s) for s in stored])

    async def _envelope(self, e: StoredEvent) -> events_pb2.EventEnvelope:
        return envelope(Delivery(e, await self.service.cursor_of(e.sequence)), self.node)

    async def Subscribe(
        self, request: events_pb2.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[events_pb2.EventEnvelope]:
        caller = current_caller()
        scope = peer_scope(caller)
        c = Checker()
        start = _STARTS.get(request.start)
        if start is None:
            c.fail("start", "is not a known StartPosition")
        if request.subscription:
            c.pattern("subscription", request.subscription, SUBSCRIPTION_RE,
                      "1-128 characters of [A-Za-z0-9._:-]")
        if start == Start.CURSOR and not request.cursor:
            c.fail("cursor", "is required with start START_POSITION_CURSOR")
        if len(request.type_patterns) > MAX_PATTERNS:
            c.fail("type_patterns", f"at most {MAX_PATTERNS} patterns")
        if request.cursor and start != Start.CURSOR:
            c.fail("cursor", "is only read with start START_POSITION_CURSOR")
        if not 0 <= request.max_batch <= MAX_STREAM_BATCH:
            c.fail("max_batch", f"must be 0 to {MAX_STREAM_BATCH}")
        if len(request.origins) > MAX_PATTERNS:
            c.fail("origins", f"at most {MAX_PATTERNS} origins")
        for i, origin in enumerate(request.origins):
            if origin not in (LOCAL_ORIGIN, ANY_ORIGIN) and not ORIGIN_RE.match(origin):
                c.fail(f"origins[{i}]", "must be 'local', '*' or a followed peer's name "
                                        "(1-64 of [a-z0-9-])")
        c.done()
        params = SubscribeParams(tuple(request.type_patterns), start or Start.UNSPECIFIED,
                                 request.cursor, request.subscription,
                                 tuple(request.origins))
        stream = self.service.subscribe(caller, scope, params)
        batching = request.max_batch > 1
        pending: list[events_pb2.EventEnvelope] = []
        size = 0
        async with contextlib.aclosing(stream):
            async for delivery in stream:
                if delivery.opened:
                    # Tell the client the subscription is in place before any event: a
                    # refused stream never gets this header, only its error status.
                    await context.send_initial_metadata(((OPEN_HEADER, "1"),))
                    continue
                if not batching or delivery.event is None:
                    yield envelope(delivery, self.node)
                    continue
                # What one read returned goes out together (never held past the page).
                env = envelope(delivery, self.node)
                pending.append(env)
                size += env.ByteSize()
                if (delivery.last_of_page or len(pending) >= request.max_batch
                        or size >= STREAM_BATCH_BYTES):
                    yield events_pb2.EventEnvelope(cursor=pending[-1].cursor, batch=pending)
                    pending, size = [], 0

    async def Ack(
        self, request: events_pb2.AckRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.AckResponse:
        c = _subscription_checker(request.subscription)
        if not request.cursor:
            c.fail("cursor", "is required")
        c.done()
        cursor = await self.service.ack(current_caller(), request.subscription, request.cursor)
        return events_pb2.AckResponse(cursor=cursor)

    async def DeleteSubscription(
        self, request: events_pb2.DeleteSubscriptionRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.DeleteSubscriptionResponse:
        _subscription_checker(request.subscription).done()
        await self.service.delete(current_caller(), request.subscription)
        return events_pb2.DeleteSubscriptionResponse()


def _subscription_checker(subscription: str) -> Checker:
    """A Checker that has checked the `subscription` field of a request."""
    c = Checker()
    c.pattern("subscription", subscription, SUBSCRIPTION_RE,
              "1-128 characters of [A-Za-z0-9._:-]")
    return c
