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


async def test_settle_waits_for_quiet_after_the_last_call_finishes() -> None:
    # A call that outlasts the quiet period: its caller sends the next one on the answer,
    # so quiet counts from when it finished, not from when it arrived.
    # (A call of 1 s against a quiet period of 0.5 s: the check below holds unless the
    # loop stalls for 0.5 s between the two, and fails whenever quiet counts from arrival.)
    drain = Drain()
    with drain.track(stream=False):
        await asyncio.sleep(1.0)
    settled = asyncio.ensure_future(drain.settle(quiet_s=0.5, max_s=30))
    await asyncio.sleep(0)
    assert not settled.done()
    await settled
