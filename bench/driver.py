"""The one load driver every target shares: N calls in flight over one channel, closed loop."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

from bench.memory import CpuGroup, cpu_delta

#: One call of a target; raises on failure.
Call = Callable[[], Awaitable[object]]


@dataclass(frozen=True)
class Measurement:
    """What one target did at one concurrency, over the measured window only."""

    target: str
    concurrency: int
    duration_s: float
    calls: int
    errors: int
    qps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    error_codes: dict[str, int] = field(default_factory=dict)
    first_error: str = ""
    #: CPU microseconds per completed call, per process group and for this client.
    cpu_us_per_call: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Measurement:
        """Inverse of to_json."""
        return cls(**data)


def percentile(sorted_ns: list[int], q: float) -> float:
    """Nearest-rank percentile of sorted nanosecond latencies, in milliseconds."""
    if not sorted_ns:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_ns)))
    return sorted_ns[rank - 1] / 1e6


async def measure(
    target: str, call: Call, *, concurrency: int, duration_s: float, warmup_s: float,
    cpu_groups: Sequence[CpuGroup] = (),
) -> Measurement:
    """Keep `concurrency` calls in flight for warm-up + duration; keep the duration's calls.

    Warm-up and measurement are one continuous run, so the window starts with a full
    pipeline instead of a ramp. A call counts when it completes inside the window; calls
    still in flight when the window closes are finished but not counted. The CPU time of
    `cpu_groups` (servers, their databases) and of this process is read at both window edges.
    """
    loop_clock = time.perf_counter_ns
    start = loop_clock() + int(warmup_s * 1e9)
    end = start + int(duration_s * 1e9)
    latencies: list[int] = []
    codes: Counter[str] = Counter()
    first_error: list[str] = []

    async def worker() -> None:
        while True:
            t0 = loop_clock()
            if t0 >= end:
                return
            try:
                await call()
            except grpc.aio.AioRpcError as exc:
                t1 = loop_clock()
                if start <= t1 < end:
                    codes[exc.code().name] += 1
                    if not first_error:
                        first_error.append(f"{exc.code().name}: {exc.details()}")
                continue
            t1 = loop_clock()
            if start <= t1 < end:
                latencies.append(t1 - t0)

    cpu: dict[str, float] = {}

    async def cpu_monitor() -> None:
        await asyncio.sleep(max(0.0, (start - loop_clock()) / 1e9))
        before = {g.name: g.snapshot() for g in cpu_groups}
        own = time.process_time()
        await asyncio.sleep(max(0.0, (end - loop_clock()) / 1e9))
        cpu["client"] = time.process_time() - own
        for g in cpu_groups:
            cpu[g.name] = cpu_delta(before[g.name], g.snapshot())

    await asyncio.gather(cpu_monitor(), *(worker() for _ in range(concurrency)))
    latencies.sort()
    n = len(latencies)
    return Measurement(
        target=target,
        concurrency=concurrency,
        duration_s=duration_s,
        calls=n,
        errors=sum(codes.values()),
        qps=n / duration_s,
        p50_ms=percentile(latencies, 50),
        p90_ms=percentile(latencies, 90),
        p99_ms=percentile(latencies, 99),
        mean_ms=(sum(latencies) / n / 1e6) if n else math.nan,
        max_ms=(latencies[-1] / 1e6) if n else math.nan,
        error_codes=dict(codes),
        first_error=first_error[0] if first_error else "",
        cpu_us_per_call={k: v / n * 1e6 for k, v in cpu.items()} if n else {},
    )
