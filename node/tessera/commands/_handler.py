"""What a command handler is: its description, its run function and the context it gets."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.rpc import code_pb2

#: Where a context sends progress: (percent or -1, message) -> still held.
ProgressSink = Callable[[int, str], Awaitable[bool]]
#: Where a context sends output: text -> still held.
OutputSink = Callable[[str], Awaitable[bool]]

#: Output is written in chunks of at most this many characters...
OUTPUT_CHUNK = 8192
#: ...or after this many seconds, whichever comes first.
OUTPUT_FLUSH_S = 0.25


async def _no_output(text: str) -> bool:
    return True


class CommandError(Exception):
    """Raise from a handler to end the operation FAILED with a chosen code and reason.

    Any other exception also ends it FAILED (code UNKNOWN, reason HANDLER_ERROR) with the
    exception's message, so never put a secret in a handler's exception text.
    """

    def __init__(self, message: str, *, code: int = code_pb2.FAILED_PRECONDITION,
                 reason: str = "COMMAND_FAILED") -> None:
        """`code` is a google.rpc.Code; the default says "the world was not as needed"."""
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason


class CommandCancelled(Exception):
    """Raise from a handler that stopped because `ctx.cancelled` was set."""


class CommandContext:
    """What a running handler gets: its arguments, progress reporting and cancellation."""

    def __init__(self, *, operation: str, command_type: str, caller: str,
                 args: Mapping[str, Any], attempt: int, progress_sink: ProgressSink,
                 output_sink: OutputSink = _no_output) -> None:
        #: The operation's name, "operations/<uuid>".
        self.operation = operation
        self.command_type = command_type
        #: Identity URI of the caller that executed the command.
        self.caller = caller
        #: The command's arguments, already validated against the handler's input schema.
        self.args = dict(args)
        #: 1 on the first start; higher when a retry-safe handler is started again after
        #: the node running it stopped.
        self.attempt = attempt
        #: Set when the caller cancelled the operation (or the node is stopping).
        self.cancelled = asyncio.Event()
        self.log = logging.getLogger(f"tessera.commands.{command_type}")
        self._sink = progress_sink
        self._output_sink = output_sink
        self._buffer: list[str] = []
        self._buffered = 0
        self._flusher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def progress(self, percent: int | None = None, message: str = "") -> bool:
        """Report progress (0-100 and/or one line); watchers see each report.

        Returns False when the operation is no longer this runner's to report on.
        Reports are durable writes: send one per meaningful step, not per byte.
        """
        p = -1 if percent is None else max(0, min(100, int(percent)))
        return await self._sink(p, message[:1000])

    async def output(self, text: str) -> None:
        """Stream output (e.g. a child process's lines); watchers receive it in order.

        Coalesced: written when 8 KiB collected or a quarter second passed, and at the end
        of the run, so a chatty process costs a few writes a second, not one per line.
        """
        if not text:
            return
        # The event store (jsonb) cannot hold NUL: one in a chunk lost the whole chunk.
        text = text.replace("\0", "\ufffd")
        self._buffer.append(text)
        self._buffered += len(text)
        if self._buffered >= OUTPUT_CHUNK:
            await self.flush()
        elif self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(OUTPUT_FLUSH_S)
        await self.flush()

    async def flush(self) -> None:
        """Write buffered output now (the runner calls it when the handler ends)."""
        async with self._lock:
            text = "".join(self._buffer)
            self._buffer.clear()
            self._buffered = 0
            for start in range(0, len(text), OUTPUT_CHUNK):
                await self._output_sink(text[start:start + OUTPUT_CHUNK])


#: A handler's body: returns a JSON object (the operation's output) or None.
Run = Callable[[CommandContext], Awaitable[Mapping[str, Any] | None]]


@dataclass(frozen=True)
class Admission:
    """What an `admit` hook sees of an Execute before its operation is stored."""

    command_type: str
    #: Identity URI of the caller.
    caller: str
    #: Name of the peer's grant that allowed the call; "" for a local caller.
    grant: str
    #: The arguments, already checked against the handler's input schema.
    args: Mapping[str, Any]


#: Called in Execute before the operation is stored: raise a TesseraError (InvalidArgument,
#: ResourceExhausted, ...) to refuse the call; the returned JSON object is stored with the
#: input under "_admission" (the handler reads it from ctx.args).
Admit = Callable[[Admission], Awaitable[Mapping[str, Any]]]
#: Called once when the operation is cancelled while running, before the handler's task is
#: interrupted; use it to stop work that runs outside the event loop (a child process).
CancelHook = Callable[[CommandContext], Awaitable[None]]


@dataclass(frozen=True)
class CommandHandler:
    """A command type and how to execute it.

    `run` is None only for the built-in resource commands, which execute inside
    Execute's transaction; every other handler runs in the background under a lease.
    """

    #: Dotted lower-case name, e.g. "task.assign"; "resource.*" is reserved.
    type: str
    run: Run | None
    #: JSON Schema (draft 2020-12) of the arguments; checked before anything runs.
    input_schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "object"})
    description: str = ""
    #: Seconds a run may take; then it ends FAILED with DEADLINE_EXCEEDED.
    timeout_s: float = 300.0
    #: True when running it again after an interrupted run is harmless; then a run whose
    #: node stopped is started again instead of ending FAILED (NODE_RESTARTED).
    retry_safe: bool = False
    on_cancel: CancelHook | None = None
    #: Optional check of each Execute before anything is stored or started.
    admit: Admit | None = None
    #: A peer's grant that names this other type allows this one too (agent.status and
    #: agent.kill come with agent.spawn: they reach only the caller's own runs).
    granted_with: str = ""

    @property
    def long_running(self) -> bool:
        """True when Execute returns before the handler finishes."""
        return self.run is not None
