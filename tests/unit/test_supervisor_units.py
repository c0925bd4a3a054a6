"""Pure parts of the supervisor: configuration handover, the data-dir lock, the drain."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tessera import config
from tessera.api import SHUTTING_DOWN, Drain
from tessera.app import DataDirInUse, DataDirLock
from tessera.app._supervisor import _flatten
from tessera.core import errors
from tessera.embedded import pid_alive


def test_the_serving_process_parses_back_exactly_the_supervisors_configuration(
    tmp_path: Path,
) -> None:
    cfg = config.load(None, environ={}, overrides={
        "node.data_dir": str(tmp_path / "d"), "node.name": "n1",
        "node.shutdown_grace_s": "2.5", "store.kinds": "task,note",
        "ratelimit.enabled": "false", "ratelimit.local_limits": "read=10/20, admin=0",
        "audit.batch_delay_ms": "0.25", "valkey.timeout_ms": "150",
    })
    again = config.load(None, environ={}, overrides=_flatten(cfg))
    assert again == cfg


def test_a_relative_data_dir_is_resolved_once_at_parse_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = config.load(None, environ={}, overrides={"node.data_dir": "rel/d"})
    assert cfg.node.data_dir == tmp_path.resolve() / "rel" / "d"


def test_a_second_lock_on_the_data_directory_names_the_holder(tmp_path: Path) -> None:
    first, second = DataDirLock(tmp_path / "node.lock"), DataDirLock(tmp_path / "node.lock")
    first.acquire()
    with pytest.raises(DataDirInUse) as exc:
        second.acquire()
    assert exc.value.holder == os.getpid()
    assert f"in use by node pid {exc.value.holder}" in exc.value.message
    first.release()
    second.acquire()  # free again once released
    second.release()


def test_pid_alive_counts_a_zombie_as_dead() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    # Not reaped yet: a zombie once it has exited.
    deadline = time.monotonic() + 30
    while pid_alive(child.pid):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    child.wait()
    assert pid_alive(os.getpid())


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
