"""The event service through the node against the same SQL through psycopg directly.

`python -m bench.events` (full) or `python -m bench.events --quick` (CI smoke, in
`make bench-quick`). Starts a node (embedded tier, temporary data directory, rate limits
raised, audit on as in production), then measures, each against a baseline in the same run:

- latency: publish→deliver p50/p99 at `--rate` events/s (batches every 10 ms) with
  `--subscribers` ephemeral Subscribe streams; each event carries its publish time
  (perf_counter_ns at the send), each subscriber records its arrival. Baseline: the node's
  own append (`store.append_events`: counter row + INSERT + pg_notify, one transaction)
  through psycopg, and as many LISTENing readers each fetching with the node's own read
  (`EventStore.read`, pages of 256) on every notification.
- throughput: PublishBatch of `--batch` events back to back for `--seconds` with one
  Subscribe stream reading; published and delivered events/s. Baseline: the same appends
  and one LISTENing reader, through psycopg.
- memory: the node's RSS idle, then with `--idle` open idle Subscribe streams.

The client (this process) shares the machine's CPUs with the node and PostgreSQL, as do
the other developers' processes: figures are comparable within a run, not across runs.
Exits 0 unless something could not run; PASS/MISS against the targets is printed.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.util
import json
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

#: Targets (issue 14).
LATENCY_P99_MAX_MS = 50.0
RATE_MIN = 5000.0
RATIO_MIN = 0.5
IDLE_RSS_MAX_MB = 100.0
PAGE = 256
OPEN_HEADER = "tessera-stream-open"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@dataclass
class Latency:
    """Publish→deliver latencies of one side, in ms."""

    label: str
    sent: int = 0
    delivered: int = 0
    expected: int = 0
    samples: list[float] = field(default_factory=list)

    def pct(self, q: float) -> float:
        if not self.samples:
            return float("nan")
        s = sorted(self.samples)
        return s[min(len(s) - 1, int(q * len(s)))]

    def summary(self) -> dict[str, Any]:
        return {"label": self.label, "sent": self.sent, "delivered": self.delivered,
                "expected": self.expected, "p50_ms": self.pct(0.50), "p99_ms": self.pct(0.99),
                "max_ms": max(self.samples, default=float("nan"))}


@dataclass
class Throughput:
    """Published and delivered events per second of one side."""

    label: str
    published: int = 0
    publish_s: float = 0.0
    delivered: int = 0
    deliver_s: float = 0.0

    @property
    def published_rate(self) -> float:
        return self.published / self.publish_s if self.publish_s else 0.0

    @property
    def delivered_rate(self) -> float:
        return self.delivered / self.deliver_s if self.deliver_s else 0.0

    def summary(self) -> dict[str, Any]:
        return {"label": self.label, "published": self.published,
                "published_per_s": self.published_rate, "delivered": self.delivered,
                "delivered_per_s": self.delivered_rate}


# -- the node ---------------------------------------------------------------------------


def _stub(channel: Any) -> Any:
    from tessera_client.pb import events_pb2_grpc

    return events_pb2_grpc.EventServiceStub(channel)


async def _open_stream(stub: Any, pattern: str, max_batch: int = 0) -> Any:
    from tessera_client.pb import events_pb2

    call = stub.Subscribe(events_pb2.SubscribeRequest(
        type_patterns=[pattern], start=events_pb2.START_POSITION_NOW, max_batch=max_batch))
    md = await call.initial_metadata()
    if not any(k == OPEN_HEADER for k, _ in (md or ())):
        raise RuntimeError(f"stream refused: {await call.code()} {await call.details()}")
    return call


async def _paced(rate: float, seconds: float, send: Any) -> int:
    """Call `send(n)` every 10 ms with the events due; returns how many were sent."""
    per_tick = max(1, round(rate / 100))
    ticks = max(1, round(seconds * 100))
    start = time.perf_counter()
    sent = 0
    for i in range(ticks):
        due = start + i * 0.01
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await send(per_tick)
        sent += per_tick
    return sent


async def node_latency(channels: list[Any], rate: float, seconds: float,
                       subscribers: int, max_batch: int = 0) -> Latency:
    from tessera_client.pb import events_pb2

    out = Latency(f"node/{max_batch}" if max_batch > 1 else "node")
    stubs = [_stub(channels[i % len(channels)]) for i in range(subscribers)]
    calls = [await _open_stream(s, "bench.lat", max_batch) for s in stubs]
    counts = [0] * subscribers

    async def reader(i: int, call: Any) -> None:
        async for msg in call:
            if msg.heartbeat:
                continue
            now = time.perf_counter_ns()
            for one in (msg.batch if len(msg.batch) else (msg,)):
                out.samples.append((now - one.data["t"]) / 1e6)
                counts[i] += 1

    readers = [asyncio.create_task(reader(i, c)) for i, c in enumerate(calls)]
    pub = _stub(channels[0])

    async def send(n: int) -> None:
        now = time.perf_counter_ns()
        batch = []
        for _ in range(n):
            r = events_pb2.PublishRequest(type="bench.lat")
            r.data.update({"t": now})
            batch.append(r)
        await pub.PublishBatch(events_pb2.PublishBatchRequest(events=batch))

    out.sent = await _paced(rate, seconds, send)
    out.expected = out.sent * subscribers
    await _settle(lambda: sum(counts) >= out.expected)
    out.delivered = sum(counts)
    for t in readers:
        t.cancel()
    for c in calls:
        c.cancel()
    return out


async def _settle(done: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a counter
        await asyncio.sleep(0.05)


async def node_throughput(channels: list[Any], seconds: float, batch: int,
                          max_batch: int = 0) -> Throughput:
    from tessera_client.pb import events_pb2

    out = Throughput(f"node/{max_batch}" if max_batch > 1 else "node")
    call = await _open_stream(_stub(channels[-1]), "bench.tput", max_batch)
    last = [0.0]

    async def reader() -> None:
        async for msg in call:
            if not msg.heartbeat:
                out.delivered += len(msg.batch) or 1
                last[0] = time.perf_counter()

    reading = asyncio.create_task(reader())
    pub = _stub(channels[0])
    request = events_pb2.PublishBatchRequest(events=[
        events_pb2.PublishRequest(type="bench.tput") for _ in range(batch)])
    for r in request.events:
        r.data.update({"n": 1})
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        await pub.PublishBatch(request)
        out.published += batch
    out.publish_s = time.perf_counter() - start
    await _settle(lambda: out.delivered >= out.published)
    out.deliver_s = last[0] - start
    reading.cancel()
    call.cancel()
    return out


async def node_idle_rss(channels: list[Any], pid: int, n: int) -> dict[str, float]:
    from bench import memory

    # The node's own processes: the one in node.json and any serving children it runs
    # (not its embedded PostgreSQL and Valkey, whose memory a subscription does not grow).
    pids = [pid, *(p for p in memory.children(pid) if "tessera" in memory.cmdline(p)
                   and "postgres" not in memory.cmdline(p)
                   and "valkey" not in memory.cmdline(p))]

    def rss_mb() -> float:
        return memory.group_memory("node", pids).rss_kb / 1024

    await asyncio.sleep(0.5)
    idle = rss_mb()
    calls = []
    for i in range(n):
        calls.append(await _open_stream(_stub(channels[i % len(channels)]), "bench.idle"))
    await asyncio.sleep(2.0)
    loaded = rss_mb()
    for c in calls:
        c.cancel()
    return {"subscriptions": n, "processes": len(pids), "idle_mb": idle,
            "with_subscriptions_mb": loaded, "delta_mb": loaded - idle}


# -- the baseline: the node's own SQL through psycopg -------------------------------------


async def _pool(dsn: str, size: int) -> Any:
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool

    pool: Any = AsyncConnectionPool(dsn, min_size=size, max_size=size, open=False,
                                    kwargs={"row_factory": dict_row, "autocommit": True})
    await pool.open(wait=True)
    return pool


async def _append(pool: Any, n: int, event_type: str, data: dict[str, Any]) -> None:
    from tessera.store import NewEvent, append_events

    async with pool.connection() as conn, conn.transaction():
        await append_events(conn, [NewEvent(event_type, data=data) for _ in range(n)],
                            actor="bench", origin="bench")


async def _listener(dsn: str, pool: Any, pattern: str, after: int,
                    on_event: Any, ready: asyncio.Event) -> None:
    """LISTEN; on each notification read pages after the last seen (the node's read)."""
    import psycopg

    from tessera.store import EVENTS_CHANNEL, EventStore

    store = EventStore(pool, origin="bench")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(f"LISTEN {EVENTS_CHANNEL}")
        ready.set()
        position = after
        async for _ in conn.notifies():
            while True:
                page = await store.read(after=position, limit=PAGE, like_patterns=[pattern],
                                        window=20_000)
                for e in page.events:
                    on_event(e)
                position = page.scanned_through
                if len(page.events) < PAGE and position >= page.state.head:
                    break


async def sql_latency(dsn: str, rate: float, seconds: float, subscribers: int) -> Latency:
    from tessera.store import EventStore

    out = Latency("psycopg")
    pool = await _pool(dsn, subscribers + 2)
    head = (await EventStore(pool, origin="bench").state()).head
    counts = [0] * subscribers

    def handler(i: int) -> Any:
        def on_event(e: Any) -> None:
            out.samples.append((time.perf_counter_ns() - e.data["t"]) / 1e6)
            counts[i] += 1
        return on_event

    readies = [asyncio.Event() for _ in range(subscribers)]
    tasks = [asyncio.create_task(_listener(dsn, pool, "bench.lat", head, handler(i),
                                           readies[i])) for i in range(subscribers)]
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 30)

    async def send(n: int) -> None:
        await _append(pool, n, "bench.lat", {"t": time.perf_counter_ns()})

    out.sent = await _paced(rate, seconds, send)
    out.expected = out.sent * subscribers
    await _settle(lambda: sum(counts) >= out.expected)
    out.delivered = sum(counts)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await pool.close()
    return out


async def sql_throughput(dsn: str, seconds: float, batch: int) -> Throughput:
    from tessera.store import EventStore

    out = Throughput("psycopg")
    pool = await _pool(dsn, 3)
    head = (await EventStore(pool, origin="bench").state()).head
    last = [0.0]

    def on_event(e: Any) -> None:
        out.delivered += 1
        last[0] = time.perf_counter()

    ready = asyncio.Event()
    task = asyncio.create_task(_listener(dsn, pool, "bench.tput", head, on_event, ready))
    await asyncio.wait_for(ready.wait(), 30)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        await _append(pool, batch, "bench.tput", {"n": 1})
        out.published += batch
    out.publish_s = time.perf_counter() - start
    await _settle(lambda: out.delivered >= out.published)
    out.deliver_s = last[0] - start
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await pool.close()
    return out


# -- driver -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.events", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: 1 s phases, 100 idle subscriptions")
    p.add_argument("--rate", type=float, default=1000.0, help="events/s of the latency phase")
    p.add_argument("--subscribers", type=int, default=10)
    p.add_argument("--seconds", type=float, default=10.0, help="length of each timed phase")
    p.add_argument("--batch", type=int, default=500, help="events per PublishBatch")
    p.add_argument("--idle", type=int, default=1000, help="idle subscriptions held open")
    p.add_argument("--stream-batch", type=int, default=256,
                   help="max_batch of the batched-stream phases (events per message)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds = min(args.seconds, 1.0)
        args.idle = min(args.idle, 100)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the events benchmark; 0 unless something could not run."""
    missing = [m for m in ("grpc", "psycopg", "psycopg_pool", "tessera", "tessera_client")
               if importlib.util.find_spec(m) is None]
    if missing:
        print(f"bench.events: {', '.join(missing)} not importable by {sys.executable}; "
              "run with the project's environment", file=sys.stderr)
        return 2
    args = parse_args(argv)
    from bench.servers import BenchError, Stack

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    root = Path(tempfile.mkdtemp(prefix="tessera-bench-events-"))
    stack = Stack(root)
    code = 0
    try:
        code = asyncio.run(run(args, stack))
    except BenchError as exc:
        print(f"bench.events: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("bench.events: interrupted", file=sys.stderr)
        code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("bench.events: stopping the node", file=sys.stderr, flush=True)
        stack.close()
        shutil.rmtree(root, ignore_errors=True)
    return code


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


async def run(args: argparse.Namespace, stack: Any) -> int:
    """Everything between starting the node and stopping it."""
    from bench.client import secure_channel
    from bench.gen_data import embedded_dsn
    from bench.run import _loadavg, machine_facts
    from bench.servers import NODE_ENV, start_node

    facts = machine_facts()
    load_before = _loadavg()
    limits = NODE_ENV["TESSERA_RATELIMIT_LOCAL_LIMITS"] + ", event=1000000/1000000"
    node = start_node(stack, "node", {
        "TESSERA_RATELIMIT_LOCAL_LIMITS": limits,
        "TESSERA_EVENTS_MAX_STREAMS_PER_CALLER": str(max(args.idle, args.subscribers) + 16),
    })
    dsn = embedded_dsn(node.extras["data_dir"])
    results: dict[str, Any] = {"facts": facts, "args": {k: str(v) for k, v in
                                                        vars(args).items()}}
    channels = [secure_channel(node.address, node.ca, node.cert, node.key, node.server_name)
                for _ in range(10)]
    try:
        print("bench.events: latency (node)", file=sys.stderr, flush=True)
        lat_node = await node_latency(channels, args.rate, args.seconds, args.subscribers)
        print("bench.events: latency (node, batched stream)", file=sys.stderr, flush=True)
        lat_batched = await node_latency(channels, args.rate, args.seconds, args.subscribers,
                                         args.stream_batch)
        print("bench.events: latency (psycopg)", file=sys.stderr, flush=True)
        lat_sql = await sql_latency(dsn, args.rate, args.seconds, args.subscribers)
        print("bench.events: throughput (node)", file=sys.stderr, flush=True)
        tp_node = await node_throughput(channels, args.seconds, args.batch)
        print("bench.events: throughput (node, batched stream)", file=sys.stderr, flush=True)
        tp_batched = await node_throughput(channels, args.seconds, args.batch,
                                           args.stream_batch)
        print("bench.events: throughput (psycopg)", file=sys.stderr, flush=True)
        tp_sql = await sql_throughput(dsn, args.seconds, args.batch)
        print("bench.events: idle subscriptions", file=sys.stderr, flush=True)
        rss = await node_idle_rss(channels, node.pid, args.idle)
    finally:
        for ch in channels:
            with contextlib.suppress(Exception):
                await ch.close()
    results.update(latency=[lat_node.summary(), lat_batched.summary(), lat_sql.summary()],
                   throughput=[tp_node.summary(), tp_batched.summary(), tp_sql.summary()],
                   memory=rss,
                   load_before=load_before, load_after=_loadavg())

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    pub_ratio = ratio(tp_node.published_rate, tp_sql.published_rate)
    del_ratio = ratio(tp_node.delivered_rate, tp_sql.delivered_rate)
    del_ratio_b = ratio(tp_batched.delivered_rate, tp_sql.delivered_rate)
    print(f"\nevents benchmark, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, "
          f"{facts.get('cpu_model', '?')}, {facts.get('cpus', '?')} CPUs, load "
          f"{load_before} -> {_loadavg()} (shared machine){' QUICK' if args.quick else ''}")
    print(f"latency at {args.rate:.0f} events/s, {args.subscribers} subscribers, "
          f"{args.seconds:.0f} s:")
    for lat in (lat_node, lat_batched, lat_sql):
        print(f"  {lat.label:8} p50 {lat.pct(0.5):7.2f} ms  p99 {lat.pct(0.99):7.2f} ms  "
              f"delivered {lat.delivered}/{lat.expected}")
    print(f"  node p99 < {LATENCY_P99_MAX_MS:.0f} ms: "
          f"{_verdict(lat_node.pct(0.99) < LATENCY_P99_MAX_MS)} (one event per message), "
          f"{_verdict(lat_batched.pct(0.99) < LATENCY_P99_MAX_MS)} (max_batch "
          f"{args.stream_batch})")
    print(f"throughput, batches of {args.batch}, one subscriber:")
    for tp in (tp_node, tp_batched, tp_sql):
        print(f"  {tp.label:8} published {tp.published_rate:9.0f}/s  delivered "
              f"{tp.delivered_rate:9.0f}/s ({tp.delivered}/{tp.published})")
    print(f"  node/psycopg published {pub_ratio:.2f}, delivered {del_ratio:.2f}: "
          f"published >= {RATE_MIN:.0f}/s {_verdict(tp_node.published_rate >= RATE_MIN)}, "
          f"delivered >= {RATE_MIN:.0f}/s {_verdict(tp_node.delivered_rate >= RATE_MIN)}, "
          f"ratios >= {RATIO_MIN} {_verdict(min(pub_ratio, del_ratio) >= RATIO_MIN)}")
    print(f"  batched stream (max_batch {args.stream_batch}): delivered "
          f"{tp_batched.delivered_rate:.0f}/s, {del_ratio_b:.2f} of psycopg: "
          f">= {RATE_MIN:.0f}/s {_verdict(tp_batched.delivered_rate >= RATE_MIN)}, "
          f">= {RATIO_MIN} {_verdict(del_ratio_b >= RATIO_MIN)}")
    print(f"memory: node RSS idle {rss['idle_mb']:.1f} MB, with {rss['subscriptions']} idle "
          f"subscriptions {rss['with_subscriptions_mb']:.1f} MB (+{rss['delta_mb']:.1f} MB): "
          f"<= {IDLE_RSS_MAX_MB:.0f} MB above idle {_verdict(rss['delta_mb'] <= IDLE_RSS_MAX_MB)}")
    if args.json:
        results.update(ratios={"published": pub_ratio, "delivered": del_ratio,
                               "delivered_batched": del_ratio_b})
        args.json.write_text(json.dumps(results, indent=2, default=str))
    if (lat_node.delivered < lat_node.expected or tp_node.delivered < tp_node.published
            or lat_batched.delivered < lat_batched.expected
            or tp_batched.delivered < tp_batched.published):
        print("bench.events: the node did not deliver every event", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
