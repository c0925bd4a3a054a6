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
from tests.fixtures.waiting import wait_until


class FakeConn:
    """Records each batch; a commit takes until `gate` is set."""

    def __init__(self, pool: FakePool) -> None:
        self.pool = pool
        self.autocommit = True

    async def execute(self, query: str, params: tuple[list[bytes]], **_: Any) -> FakeConn:
        self.pool.entered += 1
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
        #: Commits started (each waits at the gate while it is closed).
        self.entered = 0

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


def queued(writer: AuditWriter) -> int:
    """Rows waiting for a commit (what the writer's tessera_audit_queue_rows gauge shows)."""
    return len(writer._queue)


async def test_rows_queued_during_a_commit_share_the_next_one() -> None:
    pool = FakePool()
    writer = await _started(pool)
    pool.gate.clear()
    first = asyncio.create_task(writer.record(outcome(0)))
    await wait_until(lambda: pool.entered == 1, "the first batch is committing")
    rest = [asyncio.create_task(writer.record(outcome(i))) for i in range(1, 6)]
    await wait_until(lambda: queued(writer) == 5, "the other rows are queued")
    assert pool.entered == 1 and not first.done(), "no call returns before its commit"
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
    await wait_until(lambda: pool.entered == 1, "the row's batch is committing")
    call.cancel()
    pool.gate.set()
    await writer.close()
    assert [row[8] for batch in pool.batches for row in batch] == ["FAILED"]


async def test_close_writes_what_is_queued_then_refuses_new_rows() -> None:
    pool = FakePool()
    writer = await _started(pool)
    pool.gate.clear()
    calls = [asyncio.create_task(writer.record(outcome(i))) for i in range(3)]
    await wait_until(lambda: pool.entered == 1, "the first batch is committing")
    closing = asyncio.create_task(writer.close())
    await wait_until(lambda: writer._closing, "close() has begun")
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
    await wait_until(lambda: pool.batches, "the link statement ran")
    assert pool.batches == [[]], "one link statement, no row of its own"
    await writer.close()
