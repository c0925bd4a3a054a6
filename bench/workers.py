"""GetResource with `--workers 1` and `--workers 2` in the same run.

    python -m bench.workers [--duration 10] [--repeat 3] [--channels-per-worker 4]

Starts two embedded nodes, one with one serving process and one with two, then measures
them in turn (interleaved, `--repeat` rounds) with a fresh client process each time. The
client opens at least 4 x N channels, each with a connection of its own (SO_REUSEPORT
balances connections, not calls), and spreads its closed-loop calls over them. Prints
QPS, latency, CPU per call of the serving processes together and of PostgreSQL, the ratio
2 workers / 1 worker of QPS and of serving CPU per call, and each serving process's RSS
(current and peak; the target is <= 120 MB).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc

from bench.driver import Measurement, measure
from bench.memory import CpuGroup, _status_kb
from bench.servers import Endpoint, Stack, start_node
from bench.targets import _get_request_bytes, seed_resource

GET = "/tessera.v1.QueryService/GetResource"
RSS_TARGET_MB = 120.0


async def _client(args: argparse.Namespace, pem: tuple[bytes, bytes, bytes]) -> Measurement:
    ca, key, cert = pem
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                         certificate_chain=cert)
    channels = [grpc.aio.secure_channel(args.address, creds, options=[
        ("grpc.ssl_target_name_override", "localhost"),
        ("grpc.use_local_subchannel_pool", 1)]) for _ in range(args.channels)]
    try:
        await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 10) for c in channels))
        await seed_resource(channels[0])
        payload = _get_request_bytes()
        calls = [c.unary_unary(GET, _registered_method=True) for c in channels]
        for call in calls:
            await call(payload)
        turn = itertools.count()
        return await measure("node.get_resource", lambda: calls[next(turn) % len(calls)](
            payload), concurrency=args.concurrency, duration_s=args.duration,
            warmup_s=args.warmup, cpu_groups=[CpuGroup.parse(c) for c in args.cpu])
    finally:
        for c in channels:
            await c.close()


def _serving_pids(node: Endpoint) -> list[int]:
    state = json.loads((Path(node.extras["data_dir"]) / "node.json").read_text())
    return [int(p) for p in state["serving_pids"]]


def _postmaster(node: Endpoint) -> int | None:
    try:
        text = (Path(node.extras["data_dir"]) / "postgres" / "postmaster.pid").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _measure(node: Endpoint, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    pids = _serving_pids(node)
    cpu = [f"serving{i}={p}" for i, p in enumerate(pids)]
    pg = _postmaster(node)
    if pg:
        cpu.append(f"postgresql={pg}+")
    channels = max(args.channels_per_worker * workers, 4 * workers)
    argv = [sys.executable, "-m", "bench.workers", "--client", "--address", node.address,
            "--ca", str(node.ca), "--cert", str(node.cert), "--key", str(node.key),
            "--channels", str(channels), "--concurrency", str(args.concurrency),
            "--duration", str(args.duration), "--warmup", str(args.warmup),
            *itertools.chain.from_iterable(("--cpu", c) for c in cpu)]
    done = subprocess.run(argv, capture_output=True, check=True, timeout=args.duration * 4 + 60)
    m = Measurement.from_json(json.loads(done.stdout))
    serving = sum(v for k, v in m.cpu_us_per_call.items() if k.startswith("serving"))
    return {"workers": workers, "channels": channels, "qps": m.qps, "p50_ms": m.p50_ms,
            "p99_ms": m.p99_ms, "errors": m.errors, "serving_cpu_us": serving,
            "per_worker_cpu_us": {k: v for k, v in m.cpu_us_per_call.items()
                                  if k.startswith("serving")},
            "postgresql_cpu_us": m.cpu_us_per_call.get("postgresql", 0.0),
            "client_cpu_us": m.cpu_us_per_call.get("client", 0.0)}


def _rss(node: Endpoint) -> list[tuple[int, float, float]]:
    out = []
    for pid in _serving_pids(node):
        rss, hwm = _status_kb(pid, "VmRSS") or 0, _status_kb(pid, "VmHWM") or 0
        out.append((pid, rss * 1024 / 1e6, hwm * 1024 / 1e6))
    return out


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def main(argv: list[str] | None = None) -> int:
    """Run the comparison (or, with --client, one measurement)."""
    p = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--address")
    p.add_argument("--ca")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--cpu", action="append", default=[])
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--channels-per-worker", type=int, default=4)
    args = p.parse_args(argv)
    if args.client:
        pem = (Path(args.ca).read_bytes(), Path(args.key).read_bytes(),
               Path(args.cert).read_bytes())
        json.dump(asyncio.run(_client(args, pem)).to_json(), sys.stdout)
        return 0
    with tempfile.TemporaryDirectory(prefix="tessera-bench-workers-") as root:
        stack = Stack(Path(root))
        try:
            nodes = {n: start_node(stack, f"node-w{n}", {"TESSERA_NODE_WORKERS": str(n)})
                     for n in (1, 2)}
            rounds: list[dict[int, dict[str, Any]]] = []
            for r in range(args.repeat):
                got = {}
                for n in (1, 2):
                    got[n] = _measure(nodes[n], n, args)
                    got[n]["load"] = _load()
                    print(json.dumps({"round": r + 1, **got[n]}), flush=True)
                rounds.append(got)
            qps_ratio = statistics.median(g[2]["qps"] / g[1]["qps"] for g in rounds)
            cpu_ratio = statistics.median(g[2]["serving_cpu_us"] / g[1]["serving_cpu_us"]
                                          for g in rounds)
            print(f"\nQPS 2 workers / 1 worker (median of {args.repeat}): {qps_ratio:.2f}")
            print(f"serving CPU per call 2 / 1 (median): {cpu_ratio:.2f}")
            for n in (1, 2):
                print(f"workers={n}: median QPS "
                      f"{statistics.median(g[n]['qps'] for g in rounds):.0f}, serving CPU "
                      f"{statistics.median(g[n]['serving_cpu_us'] for g in rounds):.0f} us "
                      f"per call, PostgreSQL "
                      f"{statistics.median(g[n]['postgresql_cpu_us'] for g in rounds):.0f} us")
                for pid, rss, hwm in _rss(nodes[n]):
                    verdict = "PASS" if hwm <= RSS_TARGET_MB else "MISS"
                    print(f"  serving process {pid}: RSS {rss:.0f} MB, peak {hwm:.0f} MB "
                          f"(target <= {RSS_TARGET_MB:.0f} MB: {verdict})")
        finally:
            stack.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
