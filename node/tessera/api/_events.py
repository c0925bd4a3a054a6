"""EventService: the outbox is written by every command; streaming is not built yet."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import NoReturn

import grpc

from tessera.core.errors import Unimplemented
from tessera_client.pb import events_pb2, events_pb2_grpc

_LATER = (
    "is not implemented yet: events are appended to the node's log with every write, "
    "but publishing and following them over the API comes in a later release"
)


class EventServicer(events_pb2_grpc.EventServiceServicer):
    """Answers UNIMPLEMENTED, honestly, until event streaming is built."""

    async def Publish(
        self, request: events_pb2.PublishRequest, context: grpc.aio.ServicerContext
    ) -> NoReturn:
        raise Unimplemented(f"EventService.Publish {_LATER}")

    async def Subscribe(
        self, request: events_pb2.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[events_pb2.EventEnvelope]:
        raise Unimplemented(f"EventService.Subscribe {_LATER}")
        yield  # pragma: no cover - makes this an async generator, as the stub expects

    async def Ack(
        self, request: events_pb2.AckRequest, context: grpc.aio.ServicerContext
    ) -> NoReturn:
        raise Unimplemented(f"EventService.Ack {_LATER}")
