"""The runner: starts handlers of long-running commands under a lease it renews, hears
cancellations and changes over PostgreSQL LISTEN/NOTIFY, and recovers operations whose
runner died (their lease expired).

Rules it keeps:
- A handler starts only after this process won the claim UPDATE of a PENDING row, so one
  operation is started once per claim; a second start happens only after recovery put a
  retry-safe operation back to PENDING.
- Only an operation whose lease expired is recovered; a live runner renews every third of
  the lease, and one that finds its lease gone stops its handler without writing.
- Every operation ends explicitly: SUCCEEDED, FAILED (handler error, timeout,
  NODE_RESTARTED) or CANCELLED — never RUNNING forever.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import random
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from google.rpc import code_pb2

from tessera.commands._handler import CommandCancelled, CommandContext, CommandError
from tessera.commands._registry import Registered, Registry
from tessera.config import OperationsConfig
from tessera.store import (
    OPERATIONS_CHANNEL,
    Operation,
    OperationError,
    OperationStore,
    redact_dsn,
)

log = logging.getLogger(__name__)

_CODE_CANCELLED = code_pb2.CANCELLED
_CODE_UNKNOWN = code_pb2.UNKNOWN
_CODE_DEADLINE_EXCEEDED = code_pb2.DEADLINE_EXCEEDED
_CODE_INTERNAL = code_pb2.INTERNAL
_PRUNE_EVERY_S = 60.0
_RECONNECT_S = 1.0


@dataclass(eq=False)
class _Run:
    op: Operation
    reg: Registered
    ctx: CommandContext
    task: asyncio.Task[None] | None = None
    handler_task: asyncio.Task[Mapping[str, Any] | None] | None = None
    #: Why the handler task was interrupted: "cancel", "lost", "shutdown" or None.
    stop_reason: str | None = None
    #: Set with stop_reason: the runner stops waiting for the handler.
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    cancelling: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Runner:
    """Runs this process's share of long-running operations."""

    def __init__(self, ops: OperationStore, registry: Registry, cfg: OperationsConfig,
                 *, dsn: str, node_name: str) -> None:
        self.ops = ops
        self.registry = registry
        self.cfg = cfg
        self._dsn = dsn
        #: Identifies this process as a lease holder (visible in the operations table).
        self.owner = f"{node_name}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._running: dict[str, _Run] = {}
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._listening = asyncio.Event()
        self._orphans: set[asyncio.Task[Operation | None]] = set()
        #: Operations this process accepted while full, oldest first.
        self._backlog: collections.deque[str] = collections.deque()
        #: False while another process of the node prunes finished operations.
        self.prune_here: Callable[[], bool] = lambda: True

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Begin listening and sweeping; returns once the listener is subscribed."""
        self._tasks.append(asyncio.create_task(self._listen(), name="operations-listen"))
        self._tasks.append(asyncio.create_task(self._sweep(), name="operations-sweep"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), 10.0)

    async def close(self) -> None:
        """Stop: interrupt local handlers, then release their operations explicitly."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        runs = list(self._running.values())
        for run in runs:
            self._interrupt(run, "shutdown")
        if runs:
            await asyncio.wait([r.task for r in runs if r.task is not None],
                               timeout=self.cfg.cancel_grace_s + 1)
        try:
            released = await self.ops.recover(max_attempts=self.cfg.max_attempts,
                                              owner=self.owner)
        except Exception as exc:
            log.warning("could not release running operations (their leases will expire "
                        "and another node recovers them): %s", type(exc).__name__)
        else:
            for op in released:
                log.info("released %s (%s) at shutdown: %s", op.name, op.command_type,
                         op.state)

    @property
    def running(self) -> int:
        """Operations this process is running now."""
        return len(self._running)

    # -- submitting and watching -------------------------------------------------------

    async def submit(self, op: Operation) -> None:
        """Start a PENDING operation this process just accepted, if it has room.

        Without room it stays PENDING and a sweep (here or on another node) starts it.
        """
        if self._closing:
            return
        if len(self._running) >= self.cfg.max_running:
            # Started here as soon as a slot frees (other nodes only after claim_grace_s).
            self._backlog.append(op.name)
            return
        try:
            claimed = await self.ops.claim(op.name, self.owner, self.cfg.lease_ttl_s)
        except (psycopg.Error, OSError) as exc:
            # Stored already: answering an error would make the caller retry a command
            # that will run anyway. A sweep starts it after claim_grace_s.
            log.warning("could not start %s now (%s); a sweep will", op.name,
                        type(exc).__name__)
            return
        if claimed is not None:
            self._start(claimed)

    @contextlib.asynccontextmanager
    async def watch(self, name: str) -> AsyncIterator[asyncio.Event]:
        """An event set whenever the operation changes (in any node process)."""
        key = name.removeprefix("operations/")
        ev = asyncio.Event()
        self._watchers.setdefault(key, set()).add(ev)
        try:
            yield ev
        finally:
            watchers = self._watchers.get(key)
            if watchers is not None:
                watchers.discard(ev)
                if not watchers:
                    del self._watchers[key]

    # -- running one operation ---------------------------------------------------------

    def _start(self, op: Operation) -> None:
        reg = self.registry.get(op.command_type)
        if reg is None or reg.handler.run is None:
            # Not expected: a node claims by name only what it accepted, and a sweep only
            # types it has. Ending it now beats leaving it to lease expiry.
            log.error("no handler for %s (%s)", op.name, op.command_type)
            task = asyncio.create_task(self.ops.finish(
                op.name, self.owner, state="FAILED", error=OperationError(
                    code_pb2.UNIMPLEMENTED, f"no handler for {op.command_type} on the node "
                    "that started it", "NO_HANDLER")))
            self._orphans.add(task)
            task.add_done_callback(self._orphans.discard)
            return

        async def sink(percent: int, message: str) -> bool:
            try:
                return await self.ops.report_progress(op.name, self.owner, percent, message)
            except (psycopg.Error, OSError) as exc:
                log.warning("progress of %s not recorded: %s", op.name, type(exc).__name__)
                return True

        async def output_sink(text: str) -> bool:
            try:
                return await self.ops.append_output(op.name, self.owner, text)
            except (psycopg.Error, OSError) as exc:
                log.warning("output of %s not recorded: %s", op.name, type(exc).__name__)
                return True

        ctx = CommandContext(operation=op.name, command_type=op.command_type,
                             caller=op.caller, args=op.input or {}, attempt=op.attempts,
                             progress_sink=sink, output_sink=output_sink)
        run = _Run(op=op, reg=reg, ctx=ctx)
        self._running[op.uuid] = run
        run.task = asyncio.create_task(self._execute(run), name=f"operation-{op.uuid}")

    async def _execute(self, run: _Run) -> None:
        keeper = asyncio.create_task(self._keep_lease(run))
        try:
            outcome = await self._call_handler(run)
            keeper.cancel()
            if outcome is not None:
                # Everything the handler emitted is recorded before its end.
                await run.ctx.flush()
                await self._finish(run, *outcome)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("runner error on %s", run.op.name)
        finally:
            keeper.cancel()
            self._running.pop(run.op.uuid, None)
            run.done.set()
            self._wake.set()

    async def _call_handler(
        self, run: _Run
    ) -> tuple[str, dict[str, Any] | None, OperationError | None] | None:
        """(state, output, error) of the run, or None when it must not be written."""
        handler = run.reg.handler
        assert handler.run is not None
        log.info("starting %s (%s, attempt %d)", run.op.name, handler.type, run.op.attempts)
        run.handler_task = task = asyncio.ensure_future(handler.run(run.ctx))
        cancelled = ("CANCELLED", None, OperationError(_CODE_CANCELLED, "cancelled by the caller",
                                                       "CANCELLED"))
        stopper = asyncio.ensure_future(run.stop.wait())
        try:
            await asyncio.wait({task, stopper}, timeout=handler.timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            stopper.cancel()
        if not task.done():
            # Interrupted (cancel, lost lease, shutdown) or out of time. A handler that
            # ignores cancellation is abandoned after the grace: the operation still ends.
            task.cancel()
            await asyncio.wait({task}, timeout=self.cfg.cancel_grace_s)
            if not task.done():
                log.error("handler of %s ignores cancellation; abandoned", run.op.name)
            if run.stop_reason in ("lost", "shutdown"):
                return None  # recovery decides the end, not this runner
            if run.stop_reason == "cancel":
                return cancelled
            return "FAILED", None, OperationError(
                _CODE_DEADLINE_EXCEEDED,
                f"{handler.type} did not finish within its timeout of {handler.timeout_s:g} s",
                "HANDLER_TIMEOUT")
        if run.stop_reason in ("lost", "shutdown"):
            return None
        if task.cancelled():
            if run.cancelling:
                return cancelled
            return self._failed(handler.type, RuntimeError("its task was cancelled"))
        raised = task.exception()
        if raised is not None:
            if isinstance(raised, CommandCancelled) or run.cancelling:
                return cancelled
            return self._failed(handler.type, raised)
        output = task.result()
        if run.stop_reason in ("lost", "shutdown"):
            return None
        if run.cancelling:
            return cancelled
        try:
            data = dict(output or {})
            json.dumps(data)
        except (TypeError, ValueError) as exc:
            return "FAILED", None, OperationError(
                _CODE_INTERNAL, f"{handler.type} returned output that is not a JSON object: "
                f"{exc}", "HANDLER_BAD_OUTPUT")
        return "SUCCEEDED", data, None

    @staticmethod
    def _failed(command_type: str, exc: BaseException) -> tuple[str, None, OperationError]:
        if isinstance(exc, CommandError):
            return "FAILED", None, OperationError(exc.code, exc.message, exc.reason)
        log.warning("handler %s failed: %s: %s", command_type, type(exc).__name__, exc)
        text = str(exc) or type(exc).__name__
        return "FAILED", None, OperationError(_CODE_UNKNOWN, f"{type(exc).__name__}: {text}",
                                              "HANDLER_ERROR")

    async def _finish(self, run: _Run, state: str, output: dict[str, Any] | None,
                      error: OperationError | None) -> None:
        delay = 0.2
        while True:
            try:
                op = await self.ops.finish(run.op.name, self.owner, state=state,
                                           output=output, error=error)
            except (psycopg.Error, OSError) as exc:
                # The lease runs out while the store is down; then recovery ends it.
                log.warning("could not record the end of %s (%s); retrying",
                            run.op.name, type(exc).__name__)
                if self._closing:
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.cfg.lease_ttl_s / 3)
                continue
            if op is None:
                log.warning("%s ended after its lease was taken over; result dropped",
                            run.op.name)
            else:
                log.info("%s %s", op.name, op.state)
            return

    async def _keep_lease(self, run: _Run) -> None:
        period = self.cfg.lease_ttl_s / 3
        while True:
            await asyncio.sleep(period)
            try:
                held, cancel = await self.ops.renew(run.op.name, self.owner,
                                                    self.cfg.lease_ttl_s)
            except (psycopg.Error, OSError) as exc:
                log.warning("lease of %s not renewed: %s", run.op.name, type(exc).__name__)
                continue
            if not held:
                log.warning("lease of %s was lost; stopping its handler", run.op.name)
                self._interrupt(run, "lost")
                return
            if cancel:
                self._cancel(run)

    def _cancel(self, run: _Run) -> None:
        if run.cancelling:
            return
        run.cancelling = True
        asyncio.create_task(self._cancel_run(run))  # noqa: RUF006 - ends with the run

    async def _cancel_run(self, run: _Run) -> None:
        run.ctx.cancelled.set()
        hook = run.reg.handler.on_cancel
        if hook is not None:
            try:
                await asyncio.wait_for(hook(run.ctx), self.cfg.cancel_grace_s)
            except Exception as exc:
                log.warning("cancel hook of %s failed: %s", run.op.name, type(exc).__name__)
        if run.handler_task is not None and not run.handler_task.done():
            await asyncio.wait([run.handler_task], timeout=self.cfg.cancel_grace_s)
        if run.handler_task is not None and not run.handler_task.done():
            self._interrupt(run, "cancel")
        elif run.stop_reason is None:
            run.stop_reason = "cancel"

    def _interrupt(self, run: _Run, reason: str) -> None:
        run.stop_reason = run.stop_reason or reason
        run.ctx.cancelled.set()
        run.stop.set()

    # -- background loops --------------------------------------------------------------

    async def _listen(self) -> None:
        """Hear operation changes from every node process; wake watchers and cancel runs."""
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
            except (psycopg.Error, OSError) as exc:
                log.warning("operations listener cannot connect to %s: %s",
                            redact_dsn(self._dsn), type(exc).__name__)
                await asyncio.sleep(_RECONNECT_S)
                continue
            try:
                async with conn:
                    await conn.execute(f"LISTEN {OPERATIONS_CHANNEL}")
                    self._listening.set()
                    # Anything missed while disconnected: every watcher re-reads.
                    self._notify_all()
                    async for note in conn.notifies():
                        self._dispatch(note.payload)
            except (psycopg.Error, OSError) as exc:
                log.warning("operations listener lost its connection: %s", type(exc).__name__)
                await asyncio.sleep(_RECONNECT_S)

    def _dispatch(self, payload: str) -> None:
        key, _, what = payload.partition(" ")
        for ev in self._watchers.get(key, ()):
            ev.set()
        if what == "cancel":
            run = self._running.get(key)
            if run is not None:
                self._cancel(run)

    def _notify_all(self) -> None:
        for watchers in self._watchers.values():
            for ev in watchers:
                ev.set()

    async def _sweep(self) -> None:
        """Recover expired leases, start orphaned pending work, prune old operations."""
        loop = asyncio.get_running_loop()
        next_prune = loop.time()
        while True:
            try:
                for op in await self.ops.recover(max_attempts=self.cfg.max_attempts):
                    log.warning("recovered %s (%s) whose lease expired: %s", op.name,
                                op.command_type, op.state)
                while self._backlog and not self._closing \
                        and len(self._running) < self.cfg.max_running:
                    claimed = await self.ops.claim(self._backlog.popleft(), self.owner,
                                                   self.cfg.lease_ttl_s)
                    if claimed is not None:
                        self._start(claimed)
                types = self.registry.background_types()
                while types and not self._closing \
                        and len(self._running) < self.cfg.max_running:
                    claimed = await self.ops.claim_next(self.owner, self.cfg.lease_ttl_s,
                                                        types, self.cfg.claim_grace_s)
                    if claimed is None:
                        break
                    self._start(claimed)
                if loop.time() >= next_prune and self.prune_here():
                    pruned = await self.ops.prune(self.cfg.retention_h * 3600)
                    if pruned:
                        log.info("pruned %d finished operations", pruned)
                    # Short retentions (tests) are honoured within half their length.
                    next_prune = loop.time() + min(_PRUNE_EVERY_S,
                                                   self.cfg.retention_h * 1800)
            except (psycopg.Error, OSError) as exc:
                log.warning("operations sweep failed: %s", type(exc).__name__)
            self._wake.clear()
            # Jitter keeps replicas from sweeping in lock-step.
            interval = self.cfg.sweep_interval_s * random.uniform(0.8, 1.2)  # noqa: S311
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
