"""Run Tessera's benchmarks: `make bench`, `python -m bench.run` or `python bench/run.py`.

Starts a node (embedded tier, fresh temporary data directory) and a bare gRPC echo server
with the node's certificates, measures each target with the shared closed-loop driver in a
separate client process (N in flight, then 1 in flight), prints QPS and latency, the ratios
between targets and the servers' memory, with PASS/MISS against the targets. Timing never
fails the run: the exit status is 0 unless a server or a target could not run at all.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script (python bench/run.py): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.driver import Measurement
    from bench.memory import GroupMemory
    from bench.servers import Endpoint, Stack
    from bench.targets import Ratio

#: Peak RSS the node process should stay under, in MB (10^6 bytes).
NODE_RSS_MAX_MB = 200.0


@dataclass(frozen=True)
class RatioResult:
    """One ratio at one concurrency."""

    label: str
    concurrency: int
    value: float
    minimum: float | None
    #: Rounds the value is the median of.
    rounds: int = 1
    #: Denominator's server CPU per call over the numerator's (median over rounds): the QPS
    #: ratio if each server were CPU-bound on a core of its own; other load moves it less.
    cpu_value: float | None = None
    #: The target of cpu_value, if any.
    cpu_minimum: float | None = None

    @property
    def passed(self) -> bool | None:
        """Whether the ratio meets its target; None when it has none."""
        return None if self.minimum is None else self.value >= self.minimum


def mb(kb: int) -> float:
    """kB (KiB, as /proc reports) to MB (10^6 bytes)."""
    return kb * 1024 / 1e6


def _loadavg() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def machine_facts() -> dict[str, str]:
    """What the figures depend on."""
    import grpc

    cpu = "unknown"
    mem_kb = 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpus": str(len(os.sched_getaffinity(0))),
        "cpu_model": cpu,
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "loadavg_start": _loadavg(),
    }


def run_client(stack: Stack, endpoint: Endpoint, target: str, *, concurrency: int,
               duration_s: float, warmup_s: float) -> Measurement:
    """Measure one target at one concurrency in a fresh client process."""
    from bench.driver import Measurement
    from bench.servers import BenchError

    argv = [stack.python, "-m", "bench.client", "--target", target,
            "--address", endpoint.address, "--server-name", endpoint.server_name,
            "--ca", str(endpoint.ca), "--cert", str(endpoint.cert), "--key", str(endpoint.key),
            "--concurrency", str(concurrency), "--duration", str(duration_s),
            "--warmup", str(warmup_s)]
    for group in endpoint.cpu_groups:
        argv += ["--cpu", group.format()]
    proc = subprocess.run(argv, capture_output=True, env=stack.child_env(), cwd=stack.root,
                          timeout=duration_s + warmup_s + 120, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.decode(errors="replace").splitlines()[-15:])
        raise BenchError(f"client for {target} exited with {proc.returncode}:\n{tail}")
    return Measurement.from_json(json.loads(proc.stdout.decode().splitlines()[-1]))


def _fmt_ms(v: float) -> str:
    return f"{v:8.2f}" if v == v else "       -"  # NaN when no call completed


def report(facts: dict[str, str], settings: dict[str, Any], results: list[Measurement],
           ratios: list[RatioResult], mem: dict[str, GroupMemory], node_pid: int,
           failures: list[str]) -> str:
    """The printed report."""
    from bench.targets import TARGETS

    out: list[str] = []
    out.append(f"Tessera benchmark, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC")
    out.append(f"machine: {facts['cpus']} CPUs ({facts['cpu_model']}), {facts['memory']}, "
               f"{facts['kernel']}; Python {facts['python']}; grpcio {facts['grpcio']}")
    out.append(f"load average (1 min): {facts['loadavg_start']} at start, {_loadavg()} at end "
               "(the run itself adds about 2)")
    out.append(f"run: {settings['duration_s']:g} s per target after {settings['warmup_s']:g} s "
               f"warm-up, in flight {', '.join(map(str, settings['concurrency']))}, "
               f"{settings['repeat']} round(s); one client process (grpc.aio, one channel) "
               "per measurement")
    out.append("")
    rounds = settings["repeat"] > 1
    out.append(f"  {'target':<26}{'in flight':>10}{'round' if rounds else '':>6}{'calls':>9}"
               f"{'QPS':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    seen: Counter[tuple[str, int]] = Counter()
    for m in results:
        seen[(m.target, m.concurrency)] += 1
        rnd = str(seen[(m.target, m.concurrency)]) if rounds else ""
        out.append(f"  {m.target:<26}{m.concurrency:>10}{rnd:>6}{m.calls:>9}{m.qps:>10.1f}"
                   f"{_fmt_ms(m.p50_ms):>9}{_fmt_ms(m.p99_ms):>9}{m.errors:>8}")
        if m.errors:
            out.append(f"      first error: {m.first_error}")
    for f in failures:
        out.append(f"  FAILED {f}")
    out.append("")
    out.append("CPU per call, microseconds (user + system, over the measured window):")
    out.append(f"  {'target':<26}{'in flight':>10}{'server':>9}{'postgres':>9}{'valkey':>9}"
               f"{'client':>9}")
    for m in results:
        c = m.cpu_us_per_call
        cells = "".join(f"{c[k]:9.0f}" if k in c else f"{'-':>9}"
                        for k in ("server", "postgresql", "valkey", "client"))
        out.append(f"  {m.target:<26}{m.concurrency:>10}{cells}")
    out.append("")
    for r in ratios:
        goal = "" if r.minimum is None else \
            f"   target >= {r.minimum:.2f}   {'PASS' if r.passed else 'MISS'}"
        over = f", median of {r.rounds} rounds" if r.rounds > 1 else ""
        out.append(f"  ratio {r.label} (QPS, {r.concurrency} in flight{over}): "
                   f"{r.value:5.2f}{goal}")
        if r.cpu_value is not None:
            cpu_goal = "" if r.cpu_minimum is None else (
                f"   target >= {r.cpu_minimum:.2f}   "
                f"{'PASS' if r.cpu_value >= r.cpu_minimum else 'MISS'}")
            out.append(f"      by server CPU per call: {r.cpu_value:5.2f} (the ratio if each "
                       f"server had a core to itself){cpu_goal}")
    out.append("")
    out.append("memory (read after the last measurement; MB = 10^6 bytes):")
    node = mem.get("node")
    if node is not None and node.pids:
        verdict = "PASS" if mb(node.peak_rss_kb) <= NODE_RSS_MAX_MB else "MISS"
        out.append(f"  node process (tessera serve, pid {node_pid}): peak RSS (VmHWM) "
                   f"{mb(node.peak_rss_kb):.1f} MB, now {mb(node.rss_kb):.1f} MB   "
                   f"target <= {NODE_RSS_MAX_MB:.0f} MB   {verdict}")
    for key, label in (("postgresql", "embedded PostgreSQL"), ("valkey", "embedded Valkey"),
                       ("echo", "echo server"), ("echo-sql", "echo+SQL server")):
        g = mem.get(key)
        if g is None or not g.pids:
            continue
        out.append(f"  {label} ({len(g.pids)} process{'es' if len(g.pids) > 1 else ''}): "
                   f"largest peak RSS {mb(g.peak_rss_kb):.1f} MB, sum RSS now "
                   f"{mb(g.rss_kb):.1f} MB, sum PSS now {mb(g.pss_kb):.1f} MB")
    out.append("")
    out.append("targets:")
    for name in dict.fromkeys(m.target for m in results):
        out.append(f"  {name}: {TARGETS[name].description}")
    return "\n".join(out)


def compute_ratios(results: list[Measurement], levels: list[int],
                   wanted: list[Ratio]) -> list[RatioResult]:
    """Each ratio at each concurrency: the median over rounds of the per-round QPS ratio.

    Round k of the numerator is paired with round k of the denominator; they ran next to
    each other, so machine load that drifts over the run affects both.
    """
    rounds: dict[tuple[str, int], list[Measurement]] = {}
    for m in results:
        rounds.setdefault((m.target, m.concurrency), []).append(m)
    found: list[RatioResult] = []
    for level in levels:
        for r in wanted:
            pairs = list(zip(rounds.get((r.numerator, level), []),
                             rounds.get((r.denominator, level), []), strict=False))
            values = [a.qps / b.qps for a, b in pairs if b.qps > 0]
            cpu = [b.cpu_us_per_call["server"] / a.cpu_us_per_call["server"] for a, b in pairs
                   if a.cpu_us_per_call.get("server") and "server" in b.cpu_us_per_call]
            if values:
                found.append(RatioResult(r.label, level, statistics.median(values),
                                         r.minimum_at(level),
                                         len(values),
                                         statistics.median(cpu) if cpu else None,
                                         r.cpu_minimum))
    return found


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    from bench.targets import TARGETS

    defaults = [t.name for t in TARGETS.values() if t.default]
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=32,
                   help="calls in flight for the concurrent run (default 32)")
    p.add_argument("--duration", type=float, default=10.0,
                   help="measured seconds per target and concurrency (default 10)")
    p.add_argument("--warmup", type=float, default=2.0,
                   help="warm-up seconds before each measurement (default 2)")
    p.add_argument("--no-sequential", action="store_true",
                   help="skip the run with 1 call in flight")
    p.add_argument("--quick", action="store_true",
                   help="smoke run for CI: 1 s per target after 0.5 s warm-up")
    p.add_argument("--targets", default=",".join(defaults),
                   help=f"comma-separated targets (default {','.join(defaults)}; "
                        f"all: {','.join(TARGETS)})")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds per concurrency, targets interleaved; ratios are the median "
                        "over rounds (default 1)")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 1.0, 0.5
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        p.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    if args.concurrency < 1 or args.duration <= 0 or args.warmup < 0 or args.repeat < 1:
        p.error("need --concurrency >= 1, --duration > 0, --warmup >= 0 and --repeat >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; 0 unless something could not run."""
    missing = [m for m in ("grpc", "tessera", "tessera_client")
               if importlib.util.find_spec(m) is None]
    if missing:
        print(f"bench: {', '.join(missing)} not importable by {sys.executable}; install the "
              "project (pip install -e .) or run with the project's environment, e.g. "
              "`make bench PYTHON=/path/to/venv/bin/python`", file=sys.stderr)
        return 2

    from bench import memory
    from bench.servers import BenchError, Stack, embedded_pids
    from bench.targets import RATIOS, TARGETS

    args = parse_args(argv)
    levels = [args.concurrency] if args.no_sequential or args.concurrency == 1 \
        else [args.concurrency, 1]
    settings = {"duration_s": args.duration, "warmup_s": args.warmup, "concurrency": levels,
                "repeat": args.repeat, "targets": args.targets}
    facts = machine_facts()
    # Set SIGINT too: a shell starts background jobs with it ignored, and Ctrl-C or a CI
    # runner's interrupt must still stop the servers.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    root = Path(tempfile.mkdtemp(prefix="tessera-bench-"))
    stack = Stack(root)
    results: list[Measurement] = []
    failures: list[str] = []
    code = 0
    try:
        print(f"bench: starting servers under {root}", file=sys.stderr, flush=True)
        for name in args.targets:
            stack.ensure(TARGETS[name].server)
        node_pid = stack.endpoints["node"].pid if "node" in stack.endpoints else 0
        for level in levels:
            for rnd in range(args.repeat):  # rounds interleave targets: drift hits all alike
                for name in args.targets:
                    print(f"bench: {name}, {level} in flight, {args.warmup:g} s + "
                          f"{args.duration:g} s" + (f", round {rnd + 1}/{args.repeat}"
                                                   if args.repeat > 1 else ""),
                          file=sys.stderr, flush=True)
                    try:
                        results.append(run_client(
                            stack, stack.endpoints[TARGETS[name].server], name,
                            concurrency=level, duration_s=args.duration,
                            warmup_s=args.warmup,
                        ))
                    except (BenchError, subprocess.TimeoutExpired) as exc:
                        failures.append(f"{name} at {level} in flight: {exc}")
        ratios = compute_ratios(results, levels, RATIOS)
        mem: dict[str, GroupMemory] = {}
        if "node" in stack.endpoints:
            node = stack.endpoints["node"]
            mem["node"] = memory.group_memory("node", [node.pid])
            for group, pids in embedded_pids(node).items():
                mem[group] = memory.group_memory(group, pids)
        for name in ("echo", "echo-sql"):
            if name in stack.endpoints:
                mem[name] = memory.group_memory(name, [stack.endpoints[name].pid])
        print(report(facts, settings, results, ratios, mem, node_pid, failures), flush=True)
        if args.json:
            args.json.write_text(json.dumps({
                "machine": facts, "settings": settings,
                "measurements": [m.to_json() for m in results],
                "ratios": [asdict(r) | {"passed": r.passed} for r in ratios],
                "memory": {k: asdict(v) for k, v in mem.items()},
                "failures": failures,
            }, indent=2) + "\n")
        code = 1 if failures else 0
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        code = 130
    finally:
        # A second Ctrl-C must not leave a node or its PostgreSQL behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("bench: stopping servers", file=sys.stderr, flush=True)
        stack.close()
        shutil.rmtree(root, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
