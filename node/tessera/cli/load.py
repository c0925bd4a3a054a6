"""`tessera load`: import resources from a JSONL file into a running node.

Each line is one JSON object with `workspace`, `kind`, `id` and optionally `title`, `body`,
`attributes`, `embedding`, `owner`, `team`. Lines go through `CommandService.Execute`
(so validation, scope and audit are the node's own), many in flight at once. Every put
carries an idempotency key derived from the line, and progress is checkpointed next to
the file, so an interrupted load resumes where it stopped and never applies a line twice.
Bad lines are reported by number and skipped; the rest still load.

The node's rate limit is honoured: a put answered RESOURCE_EXHAUSTED waits the
`google.rpc.RetryInfo` delay (or the `retry-after` trailer; exponential backoff when it
names none) and is sent again, and every sender holds off until then, so a load slows to
the node's rate instead of failing. `--rate` paces the puts below the limit from the
start. The format is documented in docs/load.md; examples/resources.jsonl is a sample.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import grpc
from google.rpc import error_details_pb2, status_pb2

from tessera.cli._client import LocalNode, NoNode, local_node
from tessera.cli._command import Command, Env
from tessera.core.errors import TesseraError, Unavailable
from tessera_client.pb import command_pb2, resources_pb2

_FIELDS = {"workspace", "kind", "id", "title", "body", "attributes", "embedding", "owner", "team"}


@dataclass
class LoadReport:
    """What a load did."""

    total_lines: int = 0
    loaded: int = 0
    skipped_before: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)
    elapsed_s: float = 0.0
    #: Puts the node refused for its rate limit (each sent again after the wait it named).
    rate_limited: int = 0
    #: Seconds the senders held off for the rate limit (wall clock, not summed per put).
    waited_s: float = 0.0


#: A put refused this many times in a row for the rate limit (or an unreachable node)
#: ends the load; the checkpoint lets the same command resume.
MAX_ATTEMPTS = 12
_BACKOFF_START_S = 0.05
_BACKOFF_MAX_S = 10.0


class LoadAborted(TesseraError):
    """The node refused the load in a way no retry fixes (or kept refusing)."""

    reason = "LOAD_ABORTED"


def retry_delay(exc: grpc.aio.AioRpcError) -> float | None:
    """The wait a RESOURCE_EXHAUSTED answer asks for: RetryInfo, else `retry-after`."""
    metadata = dict(exc.trailing_metadata() or ())
    raw = metadata.get("grpc-status-details-bin")
    if isinstance(raw, bytes):
        try:
            details = status_pb2.Status.FromString(raw).details
        except ValueError:
            details = []
        for detail in details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                return float(info.retry_delay.ToNanoseconds()) / 1e9
    after = metadata.get("retry-after")
    try:
        return float(after) if isinstance(after, str) else None
    except ValueError:
        return None


class _Pacer:
    """When the next put may leave: `--rate` spacing, and a shared hold after a refusal."""

    def __init__(self, rate: float, report: LoadReport) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next_slot = time.monotonic()
        self.hold_until = 0.0
        self.report = report

    async def wait_turn(self) -> None:
        now = time.monotonic()
        start = max(now, self.hold_until)
        if self.interval:
            start = max(start, self.next_slot)
            self.next_slot = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)

    def hold(self, delay_s: float) -> None:
        """Every sender waits `delay_s` from now (the node's own estimate)."""
        now = time.monotonic()
        until = now + delay_s
        if until > self.hold_until:
            self.report.waited_s += until - max(now, self.hold_until)
            self.hold_until = until


def parse_line(text: str) -> command_pb2.ExecuteRequest:
    """One JSONL line as an Execute request; ValueError says what is wrong."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    unknown = set(obj) - _FIELDS
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    for name in ("workspace", "kind", "id"):
        if not isinstance(obj.get(name), str) or not obj[name]:
            raise ValueError(f"{name} is required and must be a string")
    if "attributes" in obj and not isinstance(obj["attributes"], dict):
        raise ValueError("attributes must be a JSON object")
    emb = obj.get("embedding", [])
    if not isinstance(emb, list) or not all(isinstance(x, int | float) for x in emb):
        raise ValueError("embedding must be a list of numbers")
    resource = resources_pb2.Resource(
        workspace=obj["workspace"], kind=obj["kind"], id=obj["id"],
        title=str(obj.get("title", "")), body=str(obj.get("body", "")),
        owner=str(obj.get("owner", "")), team=str(obj.get("team", "")), embedding=emb,
    )
    if obj.get("attributes"):
        resource.attributes.update(obj["attributes"])
    key = "load-" + hashlib.sha256(text.strip().encode()).hexdigest()[:40]
    return command_pb2.ExecuteRequest(
        idempotency_key=key, put_resource=command_pb2.PutResourceCommand(resource=resource)
    )


def _lines(path: Path, start: int) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8", errors="replace") as fh:
        for number, text in enumerate(fh, start=1):
            if number > start and text.strip():
                yield number, text


class _Progress:
    """A one-line progress bar on a terminal, a line every few seconds otherwise."""

    def __init__(self, total: int, out: TextIO) -> None:
        self.total, self.out, self.started = total, out, time.monotonic()
        self.tty = out.isatty()
        self.last = 0.0
        self.printed = -1

    def update(self, done: int, bad: int, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < (0.2 if self.tty else 5.0):
            return
        if final and not self.tty and done == self.printed:
            return  # the last line said it already
        self.printed = done
        self.last = now
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        frac = done / self.total if self.total else 1.0
        eta = (self.total - done) / rate if rate > 0 else 0.0
        bar = "#" * int(frac * 30)
        line = (f"[{bar:<30}] {done:,}/{self.total:,} lines  {rate:,.0f}/s  "
                f"bad {bad}  ETA {eta:,.0f}s")
        self.out.write(("\r" + line) if self.tty else line + "\n")
        if final and self.tty:
            self.out.write("\n")
        self.out.flush()


async def load_file(
    path: Path,
    node: LocalNode,
    *,
    concurrency: int = 16,
    batch_size: int = 500,
    restart: bool = False,
    rate: float = 0.0,
    progress: TextIO = sys.stderr,
) -> LoadReport:
    """Load `path` into `node`; resumes from the checkpoint unless `restart`.

    `rate` (puts per second, 0: as fast as the node admits) paces the puts. Raises
    LoadAborted (the checkpoint kept) when the node refuses in a way no retry fixes.
    """
    checkpoint = path.with_name(path.name + ".tessera-load.json")
    start = 0
    if checkpoint.exists() and not restart:
        start = int(json.loads(checkpoint.read_text()).get("lines_done", 0))
    with path.open("rb") as fh:
        total = sum(1 for line in fh if line.strip())
    report = LoadReport(total_lines=total)
    with path.open("rb") as fh:
        report.skipped_before = sum(
            1 for i, line in enumerate(fh, 1) if i <= start and line.strip()
        )
    bar = _Progress(total, progress)
    pacer = _Pacer(rate, report)
    started = time.monotonic()
    async with node.async_client() as client:
        batch: list[tuple[int, str]] = []

        async def put(number: int, request: command_pb2.ExecuteRequest) -> None:
            backoff = _BACKOFF_START_S
            for attempt in range(1, MAX_ATTEMPTS + 1):
                await pacer.wait_turn()
                try:
                    await client.command.Execute(request, timeout=30)
                    report.loaded += 1
                    return
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                    if code in (grpc.StatusCode.INVALID_ARGUMENT,
                                grpc.StatusCode.FAILED_PRECONDITION):
                        report.bad.append((number, f"{code.name}: {exc.details()}"))
                        return
                    if code not in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    grpc.StatusCode.UNAVAILABLE):
                        raise LoadAborted(
                            f"line {number}: the node answered {code.name}: "
                            f"{exc.details()}") from None
                    if attempt == MAX_ATTEMPTS:
                        what = ("rate-limited" if code is grpc.StatusCode.RESOURCE_EXHAUSTED
                                else "unavailable")
                        raise LoadAborted(
                            f"line {number}: the node was {what} {MAX_ATTEMPTS} times in a "
                            f"row ({exc.details()})") from None
                    delay = retry_delay(exc) if code is grpc.StatusCode.RESOURCE_EXHAUSTED \
                        else None
                    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                        report.rate_limited += 1
                    # The node's own estimate when it gives one; else back off exponentially.
                    pacer.hold(delay if delay is not None else backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX_S)

        async def send(number: int, text: str, sem: asyncio.Semaphore) -> None:
            async with sem:
                try:
                    request = parse_line(text)
                except ValueError as exc:
                    report.bad.append((number, str(exc)))
                    return
                await put(number, request)

        async def flush() -> None:
            sem = asyncio.Semaphore(concurrency)
            try:
                # A put that aborts the load cancels the others of its batch.
                async with asyncio.TaskGroup() as group:
                    for n, t in batch:
                        group.create_task(send(n, t, sem))
            except* LoadAborted as aborted:
                raise aborted.exceptions[0] from None
            # Every line up to the batch's last has now been applied or reported.
            checkpoint.write_text(json.dumps({"lines_done": batch[-1][0]}))
            batch.clear()
            bar.update(report.skipped_before + report.loaded + len(report.bad), len(report.bad))

        for number, text in _lines(path, start):
            batch.append((number, text))
            if len(batch) >= batch_size:
                await flush()
        if batch:
            await flush()
    bar.update(report.skipped_before + report.loaded + len(report.bad), len(report.bad),
               final=True)
    report.elapsed_s = time.monotonic() - started
    checkpoint.unlink(missing_ok=True)
    report.bad.sort()
    return report


def summary(report: LoadReport) -> str:
    """A human summary of a load."""
    lines = [
        f"loaded {report.loaded:,} resources in {report.elapsed_s:.1f}s "
        f"({report.loaded / max(report.elapsed_s, 1e-9):,.0f}/s); "
        f"{report.skipped_before:,} lines were already loaded; {len(report.bad)} bad lines skipped"
    ]
    if report.rate_limited:
        lines.append(f"the node's rate limit refused {report.rate_limited:,} puts; each was "
                     f"sent again after the wait it named ({report.waited_s:.1f}s in all)")
    for number, why in report.bad[:20]:
        lines.append(f"  line {number}: {why}")
    if len(report.bad) > 20:
        lines.append(f"  ... and {len(report.bad) - 20} more")
    return "\n".join(lines)


def _load_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="JSONL file, one resource per line")
    p.add_argument("--ca", help="trusted roots PEM (default: the node's)")
    p.add_argument("--cert", help="client certificate PEM (default: the local client's)")
    p.add_argument("--key", help="client key PEM")
    p.add_argument("--concurrency", type=int, default=16, help="puts in flight (default 16)")
    p.add_argument("--batch-size", type=int, default=500,
                   help="lines per checkpoint (default 500)")
    p.add_argument("--restart", action="store_true", help="ignore the checkpoint, start over")
    p.add_argument("--rate", type=float, default=0.0,
                   help="most puts per second (default 0: as fast as the node admits; a "
                        "put refused for the node's rate limit waits and is sent again)")


def _load(env: Env) -> int:
    """The `tessera load` command."""
    args, out = env.args, env.out
    try:
        node = local_node(env.data_dir, "client", address=args.node_address, ca=args.ca,
                          cert=args.cert, key=args.key)
    except NoNode:
        out.warn(f"tessera load: no running node found in {env.data_dir} (node.json); "
                 "give --address, --ca, --cert and --key")
        return 2
    except Unavailable as exc:  # stale: name it rather than dial a dead port
        out.warn(f"tessera load: {exc.message}")
        return 2
    if not args.file.is_file():
        out.warn(f"tessera load: {args.file} does not exist")
        return 2
    if args.rate < 0 or args.concurrency < 1 or args.batch_size < 1:
        out.warn("tessera load: --rate must be >= 0, --concurrency and --batch-size >= 1")
        return 2
    try:
        report = asyncio.run(load_file(
            args.file, node, concurrency=args.concurrency, batch_size=args.batch_size,
            restart=args.restart, rate=args.rate,
        ))
    except LoadAborted as exc:
        out.warn(f"\ntessera load: stopped: {exc.message}; lines before the last "
                 "checkpoint are loaded, and the same command resumes from there")
        return 1
    out.line(summary(report))
    return 1 if report.bad else 0


LOAD = Command("import resources from a JSONL file into a running node", _load,
               flags=_load_flags, address=True)
