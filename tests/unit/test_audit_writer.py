"""The group-committing writer against a fake pool: batching, failures, cancellation, close."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import psycopg
import pytest

from tessera.audit import AuditWriter
from tessera.calls import CallOutcome
from tessera.core.errors import Unavailable
from tessera_client.pb import query_pb2, resources_pb2


class FakeConn:
    """Records each batch; a commit takes until `gate` is set."""

    def __init__(self, pool: FakePool) -> None:
        self.pool = pool
        self.autocommit = True

    async def execute(self, query: str, params: tuple[list[bytes]], **_: Any) -> FakeConn:
        await self.pool.gate.wait()
        if self.pool.fail:
            raise psycopg.OperationalError("server closed the connection")
        self.pool.batches.append([json.loads(p) for p in params[0]])
        return self

    async def fetchone(self) -> dict[str, int]:
        return {"last": sum(len(b) for b in self.pool.batches)}


class FakePool:
    """Just enough of AsyncConnectionPool for the writer."""

    def __init__(self) -> None:
        self.batches: list[list[list[Any]]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail = False

    @asynccontextmanager
    async def connection(self, **_: object) -> AsyncIterator[FakeConn]:
        yield FakeConn(self)


def outcome(i: int, code: grpc.StatusCode = grpc.StatusCode.OK) -> CallOutcome:
    req = query_pb2.GetResourceRequest(key=resources_pb2.ResourceKey(
        workspace="w", kind="task", id=f"r{i}"))
    return CallOutcome(caller=None, service="tessera.v1.QueryService", method="GetResource",
                       code=code, reason="", request=req, response_bytes=10,
                       latency_s=0.001, trace_id="")


async def _started(pool: FakePool) -> AuditWriter:
    writer = AuditWriter(pool)  # type: ignore[arg-type]
    writer.start()
    return writer


async def test_rows_queued_during_a_commit_share_the_next_one() -> None:
    pool = FakePool()
    writer = await _started(pool)
    pool.gate.clear()
    first = asyncio.create_task(writer.record(outcome(0)))
    await asyncio.sleep(0.01)  # the first batch is now committing
    rest = [asyncio.create_task(writer.record(outcome(i))) for i in range(1, 6)]
    await asyncio.sleep(0.01)
    assert not first.done(), "no call returns before its commit"
    pool.gate.set()
    await asyncio.gather(first, *rest)
    assert [len(b) for b in pool.batches] == [1, 5]
    await writer.close()


async def test_a_failed_batch_fails_its_calls_unavailable_and_the_next_one_works() -> None:
    pool = FakePool()
    writer = await _started(pool)
    pool.fail = True
    with pytest.raises(Unavailable):
        await writer.record(outcome(0))
    pool.fail = False
    await writer.record(outcome(1))
    assert len(pool.batches) == 1
    await writer.close()


async def test_a_cancelled_call_still_gets_its_row() -> None:
    pool = FakePool()
    writer = await _started(pool)
    pool.gate.clear()
    call = asyncio.create_task(writer.record(outcome(0, grpc.StatusCode.CANCELLED)))
    await asyncio.sleep(0.01)
    call.cancel()
    pool.gate.set()
    await writer.close()
    assert [row[8] for batch in pool.batches for row in batch] == ["FAILED"]


async def test_close_writes_what_is_queued_then_refuses_new_rows() -> None:
    pool = FakePool()
    writer = await _started(pool)
    pool.gate.clear()
    calls = [asyncio.create_task(writer.record(outcome(i))) for i in range(3)]
    await asyncio.sleep(0.01)
    closing = asyncio.create_task(writer.close())
    await asyncio.sleep(0.01)
    with pytest.raises(Unavailable):
        await writer.record(outcome(9))
    pool.gate.set()
    await closing
    await asyncio.gather(*calls)
    assert sum(len(b) for b in pool.batches) == 3


async def test_an_effect_that_committed_its_record_asks_for_a_link_at_once() -> None:
    pool = FakePool()
    writer = await _started(pool)
    intent = writer.intent(lambda: outcome(7))
    row = json.loads(intent.payload())
    assert row[5] == "GetResource" and row[9] == "OK"  # the call as it stands: succeeded
    assert not intent.is_committed
    intent.committed()  # what store.effect_transaction says after its COMMIT
    assert intent.is_committed
    for _ in range(100):
        if pool.batches:
            break
        await asyncio.sleep(0.01)
    assert pool.batches == [[]], "one link statement, no row of its own"
    await writer.close()
