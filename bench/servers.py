"""The servers a run needs, started as child processes of the harness and always stopped.

`Stack` owns one temporary directory and every process it starts. A server is a function
registered in `SERVERS`; it starts a process, waits until it is ready and returns an
`Endpoint` saying where to call it and with which certificates.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import memory
from bench.memory import CpuGroup

REPO_ROOT = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """A server failed to start; the message says which and where its log is."""


@dataclass(frozen=True)
class Endpoint:
    """Where a server listens and how a client calls it."""

    name: str
    address: str
    ca: Path
    cert: Path
    key: Path
    #: The Python (or other) process serving the calls.
    pid: int
    server_name: str = "localhost"
    #: Files and values other servers may reuse (e.g. the node's PKI directory).
    extras: dict[str, Path] = field(default_factory=dict)
    #: Processes whose CPU time per call a measurement reports.
    cpu_groups: tuple[CpuGroup, ...] = ()


@dataclass
class Managed:
    """A child process and what it takes to stop it."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    stop_signal: int = signal.SIGTERM
    stop_timeout_s: float = 30.0
    #: Processes it may leave behind (e.g. a daemonised PostgreSQL), found when stopping:
    #: pid file, a string their command line must contain, the signal that stops them.
    leftovers: list[tuple[Path, str, int]] = field(default_factory=list)

    def log_tail(self, lines: int = 20) -> str:
        """The end of the process's output, for error messages."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _wait_for_file(path: Path, managed: Managed, timeout_s: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if managed.proc.poll() is not None:
            raise BenchError(f"{managed.name} exited with {managed.proc.returncode} before it "
                             f"was ready; its log ({managed.log}) ends:\n{managed.log_tail()}")
        try:
            data: dict[str, object] = json.loads(path.read_text())
            return data
        except (OSError, ValueError):
            time.sleep(0.05)
    raise BenchError(f"{managed.name} was not ready after {timeout_s:.0f} s; its log "
                     f"({managed.log}) ends:\n{managed.log_tail()}")


def _stop_pid(pid: int, marker: str, sig: int, timeout_s: float) -> None:
    """Signal a process we started (checked by its command line), then kill it if it stays."""
    if not memory.alive(pid) or marker not in memory.cmdline(pid):
        return
    for s, wait in ((sig, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, s)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not memory.alive(pid):
                return
            time.sleep(0.05)


class Stack:
    """The servers of one run, under one temporary directory."""

    def __init__(self, root: Path, python: str = sys.executable) -> None:
        self.root = root
        self.python = python
        self.processes: list[Managed] = []
        self.endpoints: dict[str, Endpoint] = {}
        (root / "logs").mkdir(parents=True, exist_ok=True)

    def child_env(self, **overrides: str) -> dict[str, str]:
        """The environment of a child: ours minus TESSERA_* (so a run is reproducible)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        env.update(overrides)
        return env

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Managed:
        """Start a child in its own session (Ctrl-C reaches only the harness, which stops it)."""
        log = self.root / "logs" / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=env, cwd=self.root,
                                    start_new_session=True)
        managed = Managed(name, proc, log)
        self.processes.append(managed)
        return managed

    def ensure(self, name: str) -> Endpoint:
        """Start server `name` (and what it requires) unless it runs already."""
        if name not in self.endpoints:
            spec = SERVERS[name]
            for dep in spec.requires:
                self.ensure(dep)
            self.endpoints[name] = spec.start(self)
        return self.endpoints[name]

    def close(self) -> None:
        """Stop every process, newest first, including what they left running."""
        for managed in reversed(self.processes):
            proc = managed.proc
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, managed.stop_signal)
                    proc.wait(managed.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                except ProcessLookupError:
                    pass
            for pidfile, marker, sig in managed.leftovers:
                pid = _read_pid(pidfile)
                if pid is not None:
                    _stop_pid(pid, marker, sig, timeout_s=10.0)
        self.processes.clear()


@dataclass(frozen=True)
class ServerSpec:
    """How to start one kind of server."""

    name: str
    start: Callable[[Stack], Endpoint]
    requires: tuple[str, ...] = ()


SERVERS: dict[str, ServerSpec] = {}


def server(name: str, *, requires: tuple[str, ...] = ()
           ) -> Callable[[Callable[[Stack], Endpoint]], Callable[[Stack], Endpoint]]:
    """Register a server start function under `name`."""

    def register(start: Callable[[Stack], Endpoint]) -> Callable[[Stack], Endpoint]:
        SERVERS[name] = ServerSpec(name, start, requires)
        return start

    return register


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


#: Settings of every benchmarked node. Local limits far above any rate a run reaches: the
#: limiter still makes its Valkey decision on every call but never rejects one.
NODE_ENV = {
    "TESSERA_RATELIMIT_LOCAL_LIMITS": "read=1000000/1000000, command=1000000/1000000",
}


def start_node(stack: Stack, name: str, env: dict[str, str] | None = None) -> Endpoint:
    """`tessera serve` on a free loopback port in a fresh data directory (embedded tier)."""
    data_dir = stack.root / name
    argv = [stack.python, "-m", "tessera.cli", "serve", "--data-dir", str(data_dir),
            "--listen", "127.0.0.1:0"]
    profile = os.environ.get("BENCH_PROFILE_NODE")
    if profile:  # see bench/profile_node.py; the node then runs under cProfile
        out = Path(profile).resolve()
        out = out.with_name(f"{out.stem}.{name}{out.suffix}")
        argv = [stack.python, "-m", "bench.profile_node", "--out", str(out), "--", *argv[3:]]
    managed = stack.spawn(name, argv, stack.child_env(**{**NODE_ENV, **(env or {})}))
    # PostgreSQL daemonises (pg_ctl), so it is not our child; Valkey is the node's child.
    # Both are stopped by the node; these catch a node that died or hung while starting.
    pg_pidfile = data_dir / "postgres" / "postmaster.pid"
    vk_pidfile = data_dir / "valkey" / "valkey.pid"
    managed.leftovers += [(pg_pidfile, str(data_dir / "postgres"), signal.SIGINT),
                          (vk_pidfile, str(data_dir / "valkey"), signal.SIGTERM)]
    state = _wait_for_file(data_dir / "node.json", managed, timeout_s=90)
    pid = int(str(state["pid"]))
    if pid != managed.proc.pid:
        raise BenchError(f"{name}: node.json names pid {pid}, but we started {managed.proc.pid}")
    # `tessera serve` is a supervisor; the calls are served by its serving process(es).
    # With one serving process that process is the server measured; with several, the
    # supervisor and all its descendants (the embedded Valkey included).
    serving = [int(p) for p in state.get("serving_pids") or []]  # type: ignore[attr-defined]
    server_pid = serving[0] if len(serving) == 1 else pid
    pg_pid, vk_pid = _read_pid(pg_pidfile), _read_pid(vk_pidfile)
    groups = [CpuGroup("server", server_pid, tree=len(serving) > 1)]
    if pg_pid:
        groups.append(CpuGroup("postgresql", pg_pid, tree=True))
    if vk_pid:
        groups.append(CpuGroup("valkey", vk_pid))
    return Endpoint(
        name=name, address=str(state["address"]), ca=Path(str(state["ca"])),
        cert=Path(str(state["client_cert"])), key=Path(str(state["client_key"])), pid=server_pid,
        extras={"data_dir": data_dir, "pki": data_dir / "pki"}, cpu_groups=tuple(groups),
    )


def embedded_pids(node: Endpoint) -> dict[str, list[int]]:
    """The node's embedded PostgreSQL (postmaster and its workers) and Valkey processes."""
    data_dir = node.extras["data_dir"]
    found: dict[str, list[int]] = {"postgresql": [], "valkey": []}
    pg = _read_pid(data_dir / "postgres" / "postmaster.pid")
    if pg and memory.alive(pg):
        found["postgresql"] = [pg, *memory.children(pg)]
    vk = _read_pid(data_dir / "valkey" / "valkey.pid")
    if vk and memory.alive(vk):
        found["valkey"] = [vk, *memory.children(vk)]
    return found


@server("node")
def _node(stack: Stack) -> Endpoint:
    """The node as it runs in production: audit on, rate limiting on (limits raised)."""
    return start_node(stack, "node")


@server("node-noaudit")
def _node_noaudit(stack: Stack) -> Endpoint:
    """Audit rows not written (`audit.enabled = false`, a benchmark-only setting)."""
    return start_node(stack, "node-noaudit", {"TESSERA_AUDIT_ENABLED": "false"})


@server("node-nolimit")
def _node_nolimit(stack: Stack) -> Endpoint:
    """No rate-limit decision (`ratelimit.enabled = false`)."""
    return start_node(stack, "node-nolimit", {"TESSERA_RATELIMIT_ENABLED": "false"})


@server("node-bare")
def _node_bare(stack: Stack) -> Endpoint:
    """Neither audit nor rate limiting: identity, validation and the read remain."""
    return start_node(stack, "node-bare", {"TESSERA_AUDIT_ENABLED": "false",
                                           "TESSERA_RATELIMIT_ENABLED": "false"})


@server("echo", requires=("node",))
def _echo(stack: Stack) -> Endpoint:
    """The bare echo server, with the node's own certificate, key and CA."""
    node = stack.endpoints["node"]
    pki = node.extras["pki"]
    ready = stack.root / "echo.json"
    argv = [stack.python, "-m", "bench.echo_server", "--listen", "127.0.0.1:0",
            "--cert", str(pki / "node.crt"), "--key", str(pki / "node.key"),
            "--ca", str(pki / "ca.crt"), "--ready-file", str(ready)]
    managed = stack.spawn("echo", argv, stack.child_env())
    managed.stop_timeout_s = 10.0
    state = _wait_for_file(ready, managed, timeout_s=30)
    pid = int(str(state["pid"]))
    return Endpoint(name="echo", address=str(state["address"]), ca=node.ca, cert=node.cert,
                    key=node.key, pid=pid, cpu_groups=(CpuGroup("server", pid),))


def _seed_node(node: Endpoint) -> None:
    """Put the benchmark's resource on the node through its API (idempotent)."""
    import asyncio

    from bench.client import secure_channel
    from bench.targets import seed_resource

    async def seed() -> None:
        async with secure_channel(node.address, node.ca, node.cert, node.key,
                                  node.server_name) as channel:
            await seed_resource(channel)

    asyncio.run(seed())


@server("echo-sql", requires=("node",))
def _echo_sql(stack: Stack) -> Endpoint:
    """The echo server plus the node's point SELECT through a psycopg pool, against the
    node's PostgreSQL, with the node's certificate, key and CA (bench/echo_sql_server.py)."""
    from bench.gen_data import embedded_dsn

    node = stack.endpoints["node"]
    _seed_node(node)
    pki = node.extras["pki"]
    ready = stack.root / "echo-sql.json"
    argv = [stack.python, "-m", "bench.echo_sql_server", "--listen", "127.0.0.1:0",
            "--cert", str(pki / "node.crt"), "--key", str(pki / "node.key"),
            "--ca", str(pki / "ca.crt"), "--dsn", embedded_dsn(node.extras["data_dir"]),
            "--ready-file", str(ready)]
    managed = stack.spawn("echo-sql", argv, stack.child_env())
    managed.stop_timeout_s = 10.0
    state = _wait_for_file(ready, managed, timeout_s=60)
    pid = int(str(state["pid"]))
    pg = [g for g in node.cpu_groups if g.name == "postgresql"]
    return Endpoint(name="echo-sql", address=str(state["address"]), ca=node.ca, cert=node.cert,
                    key=node.key, pid=pid, cpu_groups=(CpuGroup("server", pid), *pg))
