"""Is PostgreSQL up? A watch that probes it, so calls fail fast while it is down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import psycopg_pool

from tessera.core.errors import Unavailable

log = logging.getLogger(__name__)

#: Driver errors that mean "the database did not answer", never "the request was bad".
STORE_UNAVAILABLE: tuple[type[BaseException], ...] = (
    psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout,
    psycopg_pool.PoolClosed,
)


def unavailable(exc: BaseException) -> Unavailable:
    """The caller-facing error for a database that did not answer (no DSN, no detail)."""
    return Unavailable(f"PostgreSQL is unavailable ({type(exc).__name__}); retry shortly")


class StoreHealth:
    """Probes PostgreSQL through the pool; `down_reason` is non-empty while it is down.

    While it is down, the call path answers UNAVAILABLE at once instead of letting each
    call wait for the pool. A failed call can `suspect()` an outage to probe at once.
    Recovery is noticed by the next probe (every `interval_s`).
    """

    def __init__(
        self, pool: psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[Any]], *,
        interval_s: float, timeout_s: float,
        on_change: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self._pool = pool
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        #: Awaited with True/False when PostgreSQL comes back / goes down.
        self.on_change = on_change
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Empty while PostgreSQL answers; else why it is considered down.
        self.down_reason = ""

    @property
    def up(self) -> bool:
        """True while the last probe succeeded."""
        return not self.down_reason

    def check(self) -> None:
        """Raise Unavailable if PostgreSQL is known to be down."""
        if self.down_reason:
            raise Unavailable(f"PostgreSQL is down ({self.down_reason}); the node answers "
                              "again by itself when it is back; retry shortly")

    def suspect(self) -> None:
        """A call just failed talking to PostgreSQL: probe now rather than at the next tick."""
        self._wake.set()

    def start(self) -> None:
        """Start the watch."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="tessera-store-health")

    async def close(self) -> None:
        """Stop the watch."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def probe(self) -> str:
        """One probe: '' when PostgreSQL answered, else a short credential-free reason."""
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._pool.connection(timeout=self._timeout_s) as conn:
                    await conn.execute("SELECT 1")
        except TimeoutError:
            return f"no answer within {self._timeout_s:g} s"
        except STORE_UNAVAILABLE as exc:
            return f"{type(exc).__name__}: cannot reach the server"
        except psycopg.Error as exc:
            return f"{type(exc).__name__}"
        return ""

    async def _run(self) -> None:
        while True:
            reason = await self.probe()
            if reason and not self.down_reason:
                log.error("PostgreSQL is down (%s): calls answer UNAVAILABLE until it is back",
                          reason)
            if not reason and self.down_reason:
                log.warning("PostgreSQL is back: serving again")
                # Drop pooled connections that died with the server.
                with contextlib.suppress(Exception):
                    await self._pool.check()
            changed = bool(reason) != bool(self.down_reason)
            self.down_reason = reason
            if changed and self.on_change is not None:
                await self.on_change(not reason)
            self._wake.clear()
            # While down, probe more often so recovery is noticed soon.
            wait = self._interval_s / 4 if reason else self._interval_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
