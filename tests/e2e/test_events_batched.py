"""Subscribe with max_batch: what one read returns goes out in one message, same order."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tessera_client.pb import events_pb2
from tests.fixtures.calls import bad_fields
from tests.fixtures.events import WAIT_S, event, opened, publish_many
from tests.fixtures.nodes import NodeFactory


async def test_batched_stream_delivers_every_event_in_order_in_fewer_messages(
    node_factory: NodeFactory,
) -> None:
    node = node_factory(name="b", env={"TESSERA_EVENTS_KEEPALIVE_S": "1"})
    async with node.client() as c:
        published = await publish_many(c, [event("job.done", i=i) for i in range(600)])
        call = c.events.Subscribe(events_pb2.SubscribeRequest(
            type_patterns=["job.*"], start=events_pb2.START_POSITION_BEGINNING, max_batch=100))
        assert await opened(call)
        got: list[events_pb2.EventEnvelope] = []
        sizes: list[int] = []
        while len(got) < len(published):
            msg = await asyncio.wait_for(call.read(), WAIT_S)
            assert msg is not grpc.aio.EOF
            if msg.heartbeat:
                continue
            assert len(msg.batch) >= 1 and msg.cursor == msg.batch[-1].cursor
            sizes.append(len(msg.batch))
            got += msg.batch
        assert [e.id for e in got] == [e.id for e in published]
        assert [e.cursor for e in got] == [e.cursor for e in published]
        assert max(sizes) <= 100 and len(sizes) < len(published) / 10
        # Idle: heartbeats stay single envelopes, at the head.
        while True:
            msg = await asyncio.wait_for(call.read(), WAIT_S)
            if msg.heartbeat:
                assert not msg.batch and msg.cursor == published[-1].cursor
                break
        call.cancel()

        for bad in (-1, 1001):
            refused = c.events.Subscribe(events_pb2.SubscribeRequest(max_batch=bad))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await refused.read()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert bad_fields(err.value) == ["max_batch"]
