"""Graceful stop of one gRPC server: count calls in flight, refuse new ones, end streams.

grpc's own `server.stop(grace)` kills calls that reached the server but were not yet
handed to a handler (their callers saw CANCELLED), so the node first drains here. Calls a
client sent just before the signal are still queued in grpc while the event loop is busy,
so the node first takes calls in until a quiet moment (`settle`); then new calls answer
UNAVAILABLE (health and reflection still answer), calls in flight finish, calls sent
meanwhile are refused until a quiet moment again, and only then is the server stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

from tessera.calls import OPEN_SERVICES
from tessera.core import errors

#: The reason callers see on calls refused or streams ended by a stopping node.
SHUTTING_DOWN = "NODE_SHUTTING_DOWN"


class Drain:
    """The calls in flight on one server and the switch that starts its graceful stop."""

    def __init__(self) -> None:
        self.draining = False
        #: Set once open streams are told to end (the grace period is nearly over).
        self.ending = False
        self._calls = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._streams: set[asyncio.Task[object]] = set()
        #: When a call last arrived or finished (the answer to a finished call is what
        #: its caller sends its next call on).
        self._last_activity = 0.0

    @property
    def in_flight(self) -> int:
        """Calls being handled now."""
        return self._calls

    def admit(self, service: str) -> None:
        """Refuse a new call once draining (health and reflection keep answering)."""
        if self.draining and service not in OPEN_SERVICES:
            raise errors.Unavailable("the node is shutting down; retry the call (another "
                                     "replica, or this node once restarted, will serve it)",
                                     reason=SHUTTING_DOWN)

    @contextlib.contextmanager
    def track(self, *, stream: bool) -> Iterator[None]:
        """Count the current call (and remember a stream's task, to end it at the deadline)."""
        task = asyncio.current_task() if stream else None
        self._last_activity = time.monotonic()
        self._calls += 1
        self._idle.clear()
        if task is not None:
            self._streams.add(task)
        try:
            yield
        finally:
            if task is not None:
                self._streams.discard(task)
            self._calls -= 1
            self._last_activity = time.monotonic()
            if self._calls == 0:
                self._idle.set()

    async def settle(self, quiet_s: float, max_s: float) -> None:
        """Wait until no call has arrived or finished for `quiet_s` (at most `max_s`):
        before refusing, calls sent before the signal are then all in flight; after the
        calls in flight, the calls their callers sent on the answers have been taken in."""
        deadline = time.monotonic() + max_s
        while (now := time.monotonic()) < deadline:
            wait = self._last_activity + quiet_s - now
            if wait <= 0:
                return
            await asyncio.sleep(min(wait, deadline - now))

    def begin(self) -> None:
        """Stop admitting calls."""
        self.draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no call is in flight; False if `timeout_s` passed first."""
        try:
            async with asyncio.timeout(max(0.0, timeout_s)):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def end_streams(self) -> int:
        """Tell open streams to end now with UNAVAILABLE; how many there were."""
        self.ending = True
        for task in self._streams:
            task.cancel(SHUTTING_DOWN)
        return len(self._streams)

    def ended_stream(self) -> errors.Unavailable:
        """The error a stream ended by `end_streams` answers with."""
        return errors.Unavailable("the node is shutting down and ended this stream; "
                                  "reconnect and resume", reason=SHUTTING_DOWN)
