"""The reload channel: how the serving processes of one node tell each other to reload.

`AdminService.Reload` is taken by one serving process. It sends a request on the
PostgreSQL channel `CHANNEL` (NOTIFY is transactional: it goes out when the call's audit
record commits with it, see `effect_transaction`), every other serving process of the
node applies the same settings and answers on the same channel, and the sender waits for
those answers. Every message carries the node's `scope` (a random token of one `tessera
serve`), so replicas and other nodes sharing the database ignore each other's reloads.
Each process LISTENs on a connection of its own (application_name `LISTENER_APP`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import psycopg

log = logging.getLogger(__name__)

CHANNEL = "tessera_reload"
LISTENER_APP = "tessera-reload"
_MAX_BACKOFF_S = 10.0

#: Applies a reload request's settings here; returns "" on success, else why not.
Apply = Callable[[Mapping[str, str]], Awaitable[str]]


class ReloadChannel:
    """One process's end of the node's reload channel."""

    def __init__(self, dsn: str, scope: str, apply: Apply) -> None:
        self.dsn = dsn
        self.scope = scope
        self.pid = os.getpid()
        self._apply = apply
        self._task: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        #: Reload id -> answers so far (pid -> "" or the reason it failed).
        self._waiting: dict[str, dict[int, str]] = {}
        self._answered = asyncio.Condition()
        self._work: set[asyncio.Task[None]] = set()

    async def start(self, timeout_s: float = 5.0) -> None:
        """Start listening; waits briefly for the LISTEN to be in place."""
        self._task = asyncio.get_running_loop().create_task(self._listen(), name="reload channel")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), timeout_s)

    async def close(self) -> None:
        """Stop listening."""
        for task in [self._task, *self._work]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = None

    def request(self, settings: Mapping[str, str]) -> tuple[str, str]:
        """A new request: its id and the payload to send with `send`."""
        rid = uuid.uuid4().hex
        self._waiting[rid] = {}
        return rid, json.dumps({"scope": self.scope, "kind": "request", "id": rid,
                                "from": self.pid, "settings": dict(settings)})

    @staticmethod
    async def send(conn: psycopg.AsyncConnection[Any], payload: str) -> None:
        """NOTIFY inside the caller's transaction (sent when it commits)."""
        await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))

    def forget(self, rid: str) -> None:
        """Stop collecting answers to a request that was not sent."""
        self._waiting.pop(rid, None)

    async def wait(self, rid: str, pids: Callable[[], list[int]],
                   timeout_s: float) -> tuple[dict[int, str], list[int]]:
        """Wait until every process in `pids()` (re-read as they answer) has answered
        request `rid`, at most `timeout_s`: (answers by pid, pids that did not answer)."""
        answers = self._waiting[rid]

        def done() -> bool:
            return all(p in answers for p in pids() if p != self.pid)

        try:
            async with self._answered:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._answered.wait_for(done), timeout_s)
            missing = [p for p in pids() if p != self.pid and p not in answers]
            return dict(answers), missing
        finally:
            self._waiting.pop(rid, None)

    async def _listen(self) -> None:
        backoff = 1.0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                        self.dsn, autocommit=True,
                        application_name=f"{LISTENER_APP} {self.pid}") as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    backoff = 1.0
                    async for note in conn.notifies():
                        await self._received(note.payload)
            except (psycopg.Error, OSError) as exc:
                log.warning("LISTEN %s lost (%s); reconnecting in %.0f s", CHANNEL,
                            type(exc).__name__, backoff)
            self._listening.clear()
            await asyncio.sleep(backoff)
            backoff = min(_MAX_BACKOFF_S, backoff * 2)

    async def _received(self, payload: str) -> None:
        try:
            msg = json.loads(payload)
            if msg.get("scope") != self.scope:
                return  # another node's (or replica's) reload
            kind, rid, sender = msg["kind"], str(msg["id"]), int(msg["from"])
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("ignoring a malformed message on %s", CHANNEL)
            return
        if kind == "answer" and rid in self._waiting:
            async with self._answered:
                self._waiting[rid][sender] = str(msg.get("error", ""))
                self._answered.notify_all()
        elif kind == "request" and sender != self.pid:
            settings = {str(k): str(v) for k, v in dict(msg.get("settings") or {}).items()}
            task = asyncio.get_running_loop().create_task(self._serve(rid, settings))
            self._work.add(task)
            task.add_done_callback(self._work.discard)

    async def _serve(self, rid: str, settings: Mapping[str, str]) -> None:
        try:
            error = await self._apply(settings)
        except Exception as exc:
            log.exception("reload request %s failed here", rid)
            error = f"{type(exc).__name__}"
        answer = json.dumps({"scope": self.scope, "kind": "answer", "id": rid,
                             "from": self.pid, "error": error})
        try:
            async with await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, application_name=f"{LISTENER_APP} {self.pid}",
                    connect_timeout=5) as conn:
                await self.send(conn, answer)
        except (psycopg.Error, OSError) as exc:
            log.warning("could not answer reload request %s (%s)", rid, type(exc).__name__)
