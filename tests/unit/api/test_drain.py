"""Unit tests of tessera.api: drain."""

from __future__ import annotations

import asyncio

import pytest

from tessera.api import SHUTTING_DOWN, Drain
from tessera.core import errors


async def test_the_drain_refuses_new_calls_but_not_health_and_waits_for_calls_in_flight(
) -> None:
    drain = Drain()
    release = asyncio.Event()

    entered = asyncio.Event()

    async def call() -> None:
        with drain.track(stream=False):
            entered.set()
            await release.wait()

    task = asyncio.ensure_future(call())
    await asyncio.wait_for(entered.wait(), 30)
    assert drain.in_flight == 1
    drain.begin()
    with pytest.raises(errors.Unavailable) as exc:
        drain.admit("tessera.v1.QueryService")
    assert exc.value.reason == SHUTTING_DOWN
    drain.admit("grpc.health.v1.Health")  # health keeps answering (NOT_SERVING)
    assert not await drain.wait_idle(0.01)
    release.set()
    assert await drain.wait_idle(5)
    await task


async def test_end_streams_cancels_only_open_streams() -> None:
    drain = Drain()
    started = asyncio.Event()

    async def stream() -> str:
        with drain.track(stream=True):
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                return "ended" if drain.ending else "cancelled"
        return "done"

    task = asyncio.ensure_future(stream())
    await started.wait()
    assert drain.end_streams() == 1
    assert await task == "ended"
    assert drain.in_flight == 0
