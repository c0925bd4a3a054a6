"""Jobs that must run once, whatever the number of processes sharing the database.

A node with several serving processes (`tessera serve --workers N`), and replicas behind
one database, would each run the pruning jobs; a `Lease` lets exactly one of them do it.
It is a session advisory lock held on a connection of its own: the process holding it
runs the jobs, the others try again every `retry_s`. A process that dies, or loses its
connection, releases the lock with it, and another one takes over within `retry_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any

import psycopg

log = logging.getLogger(__name__)

#: application_name of a lease's connection; the holder's pid follows it.
LEASE_APP = "tessera-lease"


class Lease:
    """One advisory lock (named by `key`) on its own connection; `held` while it is ours."""

    def __init__(self, dsn: str, key: str, *, retry_s: float = 2.0) -> None:
        self.dsn = dsn
        self.key = key
        self.retry_s = retry_s
        self.held = False
        self._taken = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin trying to take the lock (in the background)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"lease {self.key}")

    async def _run(self) -> None:
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, connect_timeout=max(1, round(self.retry_s)),
                    application_name=f"{LEASE_APP} {self.key} {os.getpid()}")
                async with conn:
                    while True:
                        # Once held, a cheap statement proves the connection (and so the
                        # lock) is still there; pg_try_advisory_lock again would stack it.
                        if self.held:
                            await conn.execute("SELECT 1")
                        else:
                            cur = await conn.execute(
                                "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                                (self.key,))
                            row = await cur.fetchone()
                            if row is not None and row[0]:
                                self.held = True
                                self._taken.set()
                                log.info("this process (pid %d) runs the %s jobs",
                                         os.getpid(), self.key)
                        await asyncio.sleep(self.retry_s)
            except (psycopg.Error, OSError) as exc:
                if self.held:
                    log.warning("lost the %s lease (%s); another process takes over",
                                self.key, type(exc).__name__)
                self.held = False
                self._taken.clear()
                await asyncio.sleep(self.retry_s)

    async def while_held(self, job: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `job` whenever the lease is ours; cancel it when the lease is lost. A job
        that returns is started again only after the lease was lost and taken again."""
        while True:
            await self._taken.wait()
            task = asyncio.get_running_loop().create_task(job())
            try:
                while self.held:
                    await asyncio.wait({task}, timeout=min(1.0, self.retry_s))
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def close(self) -> None:
        """Stop, releasing the lock (its connection closes)."""
        self.held = False
        self._taken.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
