"""A third-party command-handler plugin, as tests install it: a module plus a .dist-info
with `tessera.commands` entry points (see tests/fixtures/plugins.py).

Every handler appends one line per start to the file named by `args.path`, so tests count
starts (the side effect) without looking inside the node.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tessera.commands import CommandCancelled, CommandContext, CommandHandler

_PATH = {"type": "string", "minLength": 1}


def _append(path: str, line: str) -> None:
    with Path(path).open("a") as f:
        f.write(line + "\n")


def _lines(path: str) -> int:
    return len(Path(path).read_text().splitlines())


def _exists(path: str) -> bool:
    return Path(path).exists()


async def _count(ctx: CommandContext) -> Mapping[str, Any]:
    _append(ctx.args["path"], f"start {ctx.operation} {ctx.attempt}")
    return {"lines": _lines(ctx.args["path"])}


async def _steps(ctx: CommandContext) -> Mapping[str, Any]:
    """`steps` progress reports over about `seconds`; waits for `gate` (a file) first."""
    path = ctx.args["path"]
    _append(path, f"start {ctx.operation} {ctx.attempt}")
    steps = int(ctx.args.get("steps", 3))
    pause = float(ctx.args.get("seconds", 0)) / max(steps, 1)
    gate = ctx.args.get("gate")
    while gate and not _exists(gate):
        if ctx.cancelled.is_set():
            _append(path, "cancelled")
            raise CommandCancelled
        await asyncio.sleep(0.05)
    lines = int(ctx.args.get("lines", 0))
    for i in range(1, steps + 1):
        for j in range(lines):
            await ctx.output(f"step {i} line {j}\n")
        await ctx.progress(i * 100 // steps, f"step {i}")
        try:
            await asyncio.wait_for(ctx.cancelled.wait(), pause)
        except TimeoutError:
            continue
        _append(path, "cancelled")
        raise CommandCancelled
    return {"steps": steps, "attempt": ctx.attempt}


async def _hook(ctx: CommandContext) -> None:
    _append(ctx.args["path"], "hook")


async def _fail(ctx: CommandContext) -> Mapping[str, Any]:
    _append(ctx.args["path"], f"start {ctx.operation} {ctx.attempt}")
    raise RuntimeError(f"boom: {ctx.args.get('why', 'no reason')}")


async def _forever(ctx: CommandContext) -> Mapping[str, Any]:
    _append(ctx.args["path"], f"start {ctx.operation} {ctx.attempt}")
    await asyncio.Event().wait()
    return {}


async def _stubborn(ctx: CommandContext) -> Mapping[str, Any]:
    """Ignores the first cancellation for a while, as a badly written handler might."""
    _append(ctx.args["path"], f"start {ctx.operation} {ctx.attempt}")
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        _append(ctx.args["path"], "ignoring cancellation")
        await asyncio.sleep(float(ctx.args.get("ignore_s", 5)))
    return {}


_STEPS_SCHEMA = {
    "type": "object", "required": ["path"], "additionalProperties": False,
    "properties": {"path": _PATH, "steps": {"type": "integer", "minimum": 1, "maximum": 1000},
                   "seconds": {"type": "number", "minimum": 0}, "gate": _PATH,
                   "lines": {"type": "integer", "minimum": 0, "maximum": 100000}},
}

COUNT = CommandHandler(
    type="test.count", run=_count, description="Append one line to a file.",
    input_schema={"type": "object", "required": ["path"],
                  "properties": {"path": _PATH, "note": {"type": "string"}}},
)
SLEEP = CommandHandler(
    type="test.sleep", run=_steps, on_cancel=_hook, input_schema=_STEPS_SCHEMA,
    description="Report progress in steps; cancellable; not safe to retry.", timeout_s=3600,
)
RESUMABLE = CommandHandler(
    type="test.resumable", run=_steps, input_schema=_STEPS_SCHEMA, retry_safe=True,
    description="Like test.sleep, but safe to start again after its node stopped.",
    timeout_s=3600,
)
FAIL = CommandHandler(type="test.fail", run=_fail, description="Raise.",
                      input_schema={"type": "object", "required": ["path"],
                                    "properties": {"path": _PATH, "why": {"type": "string"}}})


STUBBORN = CommandHandler(
    type="test.stubborn", run=_stubborn, timeout_s=1.0,
    description="Times out and then ignores cancellation for ignore_s seconds.",
    input_schema={"type": "object", "required": ["path"],
                  "properties": {"path": _PATH, "ignore_s": {"type": "number"}}})


def slowpoke() -> list[CommandHandler]:
    """A factory entry point returning a list: a handler that outlives its timeout."""
    return [CommandHandler(type="test.slowpoke", run=_forever, timeout_s=1.0,
                           description="Never finishes; times out after 1 s.",
                           input_schema={"type": "object", "required": ["path"],
                                         "properties": {"path": _PATH}})]
