"""`tessera serve`: the supervisor, which owns what exists once per node.

It holds the data directory's lock for the node's life, runs the embedded PostgreSQL and
Valkey as its own children and restarts them with backoff when they die, and runs the
serving process(es) that hold the gRPC servers (`python -m tessera.app._serving`),
restarting one that dies after it served. Every child gets a parent-death signal, so a
supervisor killed with SIGKILL takes its children with it.

A serving process learns its configuration and the embedded services' DSN and URL from
a private pipe, and reports readiness (its address) on another; the supervisor then writes
node.json, with its own pid.

`node.workers` (`--workers N`) serving processes run. With more than one, the supervisor
first binds the listen and enrolment ports itself without SO_REUSEPORT - the check that
nobody, another node included, holds them - then marks its (never listening) sockets
SO_REUSEPORT and keeps them for the node's life; only then do the serving processes bind
the same ports with SO_REUSEPORT. One serving process never sets it, so a second node can
never silently share a node's port. The kernel spreads new connections over the serving
processes; the supervisor serves the node's merged metrics (see `_metrics`).

SIGHUP: forwarded to every serving process, each of which reloads the configuration
(`AdminService.Reload` does the same through one of them).

SIGINT/SIGTERM: each serving process stops gracefully (health NOT_SERVING, calls in flight
finish within node.shutdown_grace_s), then Valkey and PostgreSQL stop, then the lock goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tessera.api import RELOADED_FILE
from tessera.app._lock import DataDirLock
from tessera.app._metrics import start_node_metrics
from tessera.app._node import grpcurl_command, prepare_data_dir
from tessera.config import Config, ConfigSource, flatten
from tessera.core.errors import AddressInUse, ConfigError, TesseraError, Unavailable
from tessera.core.net import host_of, split_host_port
from tessera.core.paths import NodePaths
from tessera.embedded import (
    EmbeddedPostgres,
    EmbeddedService,
    EmbeddedValkey,
    describe_exit,
    spawn,
    terminate,
    wait_exit,
)
from tessera.pki import resolve_node_name, write_atomic

log = logging.getLogger(__name__)

#: Seconds a service gets to become ready after it is spawned.
_READY_TIMEOUT_S = 60.0
#: Restart backoff: first pause, longest pause, and how long a child must have run for
#: its next crash to count as a first one again.
_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 30.0
_STABLE_S = 60.0
#: Seconds an embedded service gets to stop cleanly before it is killed.
_SERVICE_STOP_S = 30.0


#: Starts a child and waits until it is ready (or has exited); the process.
Launch = Callable[[], Awaitable[subprocess.Popen[bytes]]]


class ServingFailed(TesseraError):
    """The serving process exited before it ever served (its own error is on stderr)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"the serving process exited with {describe_exit(code)}")
        self.code = code


class Child:
    """One supervised child process: started, watched, restarted with backoff, stopped."""

    def __init__(self, name: str, label: str, launch: Launch, stop_signal: int,
                 on_change: Callable[[], None]) -> None:
        self.name, self.label = name, label
        self._launch = launch
        self.stop_signal = stop_signal
        self._on_change = on_change
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.last_exit = ""
        self.last_exit_at: str | None = None
        self._started_at = 0.0
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None

    def status(self) -> dict[str, Any]:
        """For run/supervisor.json and doctor."""
        running = self.proc is not None and self.proc.poll() is None
        return {"label": self.label, "pid": self.proc.pid if self.proc else None,
                "running": running, "restarts": self.restarts, "last_exit": self.last_exit,
                "last_exit_at": self.last_exit_at}

    async def start(self) -> None:
        """First start; raises if the child does not come up. Then it is watched."""
        self.proc = await self._launch()
        self._started_at = time.monotonic()
        if self.proc.poll() is not None:
            raise ServingFailed(self.proc.returncode)
        self._on_change()
        self._watch = asyncio.get_running_loop().create_task(self._watch_and_restart())

    async def _watch_and_restart(self) -> None:
        failures = 0
        while True:
            assert self.proc is not None
            code = await wait_exit(self.proc)
            if self._stopping:
                return
            ran_s = time.monotonic() - self._started_at
            failures = 1 if ran_s >= _STABLE_S else failures + 1
            delay = min(_BACKOFF_FIRST_S * 2 ** (failures - 1), _BACKOFF_MAX_S)
            self.restarts += 1
            self.last_exit = describe_exit(code)
            self.last_exit_at = dt.datetime.now(dt.UTC).isoformat()
            log.warning("%s (pid %d) exited with %s; restarting in %.1f s (restart %d)",
                        self.label, self.proc.pid, self.last_exit, delay, self.restarts)
            self._on_change()
            await asyncio.sleep(delay)
            try:
                self.proc = await self._launch()
            except (TesseraError, OSError) as exc:
                log.error("%s could not be restarted: %s", self.label, exc)
                continue  # self.proc is the dead one: wait_exit returns at once, backoff grows
            self._started_at = time.monotonic()
            if self.proc.poll() is None:
                log.warning("%s is back (pid %d)", self.label, self.proc.pid)
            self._on_change()

    async def stop(self, timeout_s: float) -> None:
        """Stop watching, then stop the child with its signal; SIGKILL after `timeout_s`."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(self.stop_signal)
        try:
            async with asyncio.timeout(timeout_s):
                await wait_exit(proc)
        except TimeoutError:
            log.error("%s (pid %d) did not stop in %.0f s; killing it", self.label, proc.pid,
                      timeout_s)
            proc.kill()
            await wait_exit(proc)
        self._on_change()


#: The configuration as `section.field` overrides (kept for its tests' name).
_flatten = flatten


async def _read_all(fd: int) -> bytes:
    """Everything written to a pipe until its writer closes it (or exits)."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    closed: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if data:
            chunks.append(data)
        elif not closed.done():
            closed.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await closed
    finally:
        loop.remove_reader(fd)
    return b"".join(chunks)


def reserve_port(setting: str, address: str) -> socket.socket:
    """Bind `address` (port 0: a free port) without SO_REUSEPORT, which fails if anyone
    holds it, then set SO_REUSEPORT so the node's serving processes can bind it too.

    The socket never listens (no connection reaches it) and is kept for the node's life,
    so no other node can take the port between the check and the serving processes'
    binds, or while one of them restarts.
    """
    host, port = split_host_port(address)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"{setting}: cannot resolve {address} ({exc.strerror})") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            # Connections of a node that just stopped linger in TIME_WAIT and refuse a
            # plain bind. SO_REUSEADDR passes over those but still fails on any listener
            # and on any socket bound without it (every node's reservation).
            sock.close()
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            # Cleared once bound: another node's check passes over it no more than over
            # a plain reservation (checked by the kernel at each later bind).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
            log.info("%s: %s is held only by closed connections (TIME_WAIT); taking it",
                     setting, address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUse(f"cannot listen on {address}: another process (another "
                               f"node?) already listens there; stop it, or choose a free "
                               f"port with {setting}") from None
        raise ConfigError(f"{setting}: cannot bind {address} ({exc.strerror})") from None
    return sock


def _with_port(address: str, sock: socket.socket) -> str:
    return f"{host_of(address)}:{sock.getsockname()[1]}"


class Supervisor:
    """Runs one node on one data directory (whose lock the caller holds)."""

    def __init__(self, cfg: Config, paths: NodePaths, log_level: str,
                 source: ConfigSource | None = None, loaded: Config | None = None) -> None:
        self.cfg, self.paths, self.log_level = cfg, paths, log_level
        #: Where the configuration came from and what it was before the node name was
        #: resolved, for the serving processes' reloads; and this node's reload scope.
        self.source = source
        self._loaded = flatten(loaded or cfg)
        self.scope = secrets.token_hex(8)
        self.services: list[tuple[EmbeddedService, Child]] = []
        self.serving: list[Child] = []
        self.dsn = cfg.store.dsn
        self.valkey_url = cfg.valkey.url
        self._config = _flatten(cfg)
        self._state: dict[str, Any] = {}
        self.workers = cfg.node.worker_count
        #: The ports held for the serving processes (only with several of them).
        self._reserved: list[socket.socket] = []
        #: Each serving process's private metrics port, by its index.
        self._metrics_ports: dict[int, int] = {}
        self._metrics_server: Any = None
        #: node.json is written only once the node has printed where it serves.
        self._announced = False

    # -- embedded services ----------------------------------------------------------

    def _service_launcher(self, service: EmbeddedService) -> Launch:
        async def launch() -> subprocess.Popen[bytes]:
            service.prepare()
            proc = service.spawn()
            deadline = time.monotonic() + _READY_TIMEOUT_S
            try:
                while not service.ready(proc):
                    if proc.poll() is not None:
                        raise Unavailable(f"{service.label} exited with "
                                          f"{describe_exit(proc.returncode)}; "
                                          f"see {service.log_path}")
                    if time.monotonic() > deadline:
                        raise Unavailable(f"{service.label} did not become ready; "
                                          f"see {service.log_path}")
                    await asyncio.sleep(0.02)
            except BaseException:  # not ready, or the node stops meanwhile: leave nothing
                terminate(proc, service.stop_signal, _SERVICE_STOP_S)
                raise
            return proc

        return launch

    async def _start_service(self, service: EmbeddedService) -> str:
        on_change = self._write_status
        if isinstance(service, EmbeddedPostgres):
            on_change = self._postgres_changed
        child = Child(service.name, service.label, self._service_launcher(service),
                      service.stop_signal, on_change)
        self.services.append((service, child))
        await child.start()
        return service.endpoint

    # -- serving processes ----------------------------------------------------------

    def _serving_launcher(self, index: int) -> Launch:
        async def launch() -> subprocess.Popen[bytes]:
            spec_r, spec_w = os.pipe()
            ready_r, ready_w = os.pipe()
            spec = {"config": self._config, "dsn": self.dsn, "valkey_url": self.valkey_url,
                    "log_level": self.log_level, "workers": self.workers,
                    "loaded": self._loaded, "scope": self.scope,
                    "source": self.source.to_json() if self.source else None}
            try:
                # --data-dir only names the process for `ps`; the spec is what it runs.
                proc = spawn([sys.executable, "-m", "tessera.app._serving",
                              "--spec-fd", str(spec_r), "--ready-fd", str(ready_w),
                              "--data-dir", str(self.paths.data_dir)],
                             death_signal=signal.SIGTERM, pass_fds=(spec_r, ready_w))
            finally:
                os.close(spec_r)
                os.close(ready_w)
            try:
                with os.fdopen(spec_w, "wb") as f:
                    f.write(json.dumps(spec).encode())
                message = await _read_all(ready_r)
            except BaseException:  # the node stops before this one served: leave nothing
                terminate(proc, signal.SIGTERM, self.cfg.node.shutdown_grace_s)
                raise
            finally:
                os.close(ready_r)
            if not message:  # it exited (or closed the pipe) before serving
                await wait_exit(proc)
                return proc
            state = json.loads(message)
            bound = state.pop("bound")
            # A restarted serving process takes the same ports, so node.json stays true.
            self._config["node.listen_address"] = bound["listen"]
            self._config["node.enroll_listen_address"] = bound["enroll"]
            if bound.get("metrics_port"):
                self._metrics_ports[index] = int(bound["metrics_port"])
            self._state = state
            log.debug("serving process %d (pid %d) is ready", index, proc.pid)
            return proc

        return launch

    def _postgres_changed(self) -> None:
        """PostgreSQL died or is back: serving processes drop their pooled connections to
        the old server (SIGUSR1), so no call is handed one that is already dead."""
        self._write_status()
        for child in self.serving:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGUSR1)

    def _reload(self) -> None:
        """SIGHUP: every serving process re-reads the configuration (and logs what it did)."""
        log.info("SIGHUP: reloading the configuration in every serving process")
        for child in self.serving:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGHUP)

    def _write_state(self) -> None:
        state = {**self._state, "pid": os.getpid(),
                 "serving_pids": [c.proc.pid for c in self.serving if c.proc is not None]}
        write_atomic(self.paths.state_file, json.dumps(state, indent=2).encode())

    def _write_status(self) -> None:
        children = {child.name: child.status() for _, child in self.services}
        for i, c in enumerate(self.serving):
            children[c.name] = {**c.status(), "metrics_port": self._metrics_ports.get(i)}
        self.paths.run.mkdir(mode=0o700, exist_ok=True)
        write_atomic(self.paths.supervisor_state, json.dumps(
            {"pid": os.getpid(), "children": children}, indent=2).encode())
        if self._announced and self._state and self.serving:
            self._write_state()

    # -- life cycle -----------------------------------------------------------------

    async def _start(self) -> None:
        if not self.dsn:
            self.dsn = await self._start_service(EmbeddedPostgres(self.paths.pgdata))
        if not self.valkey_url:
            self.valkey_url = await self._start_service(EmbeddedValkey(self.paths.valkey))
        for i in range(self.workers):
            self.serving.append(Child(f"serving-{i}", f"serving process {i}",
                                      self._serving_launcher(i), signal.SIGTERM,
                                      self._write_status))
        # The first alone: it migrates the schema and makes the certificates the others
        # then find in place.
        await self.serving[0].start()
        await asyncio.gather(*(c.start() for c in self.serving[1:]))
        if self.workers > 1 and self.cfg.metrics.listen_address:
            self._metrics_server = start_node_metrics(
                self.cfg.metrics.listen_address,
                lambda: [self._metrics_ports[i] for i in sorted(self._metrics_ports)])

    def _reserve_ports(self) -> None:
        """With several serving processes, hold their shared ports (see module doc)."""
        if self.workers <= 1:
            return
        n = self.cfg.node
        listen = reserve_port("node.listen_address", n.listen_address)
        self._reserved.append(listen)
        self._config["node.listen_address"] = _with_port(n.listen_address, listen)
        enroll_at = n.enroll_listen_address or f"{host_of(n.listen_address)}:0"
        enroll = reserve_port("node.enroll_listen_address", enroll_at)
        self._reserved.append(enroll)
        self._config["node.enroll_listen_address"] = _with_port(enroll_at, enroll)

    async def _stop(self) -> None:
        # Serving processes first (they drain within the grace period), then the services
        # they use, in reverse order of start.
        grace = self.cfg.node.shutdown_grace_s
        await asyncio.gather(*(c.stop(grace + _SERVICE_STOP_S) for c in self.serving))
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        for sock in self._reserved:
            sock.close()
        for _, child in reversed(self.services):
            await child.stop(_SERVICE_STOP_S)

    async def run(self) -> int:
        """Start, print where the node serves, run until SIGINT/SIGTERM, stop."""
        cfg = self.cfg
        # node.json of a node that was killed: nobody serves there now. A new node starts
        # from its configuration, not from the last one's reloads.
        self.paths.state_file.unlink(missing_ok=True)
        (self.paths.run / RELOADED_FILE).unlink(missing_ok=True)
        # Before anything starts: a port someone holds is a one-line configuration error.
        self._reserve_ports()
        workers = f", {self.workers} serving processes" if self.workers > 1 else ""
        _say(cfg, f"tessera: starting node {cfg.node.name} ({cfg.tier} tier{workers}) in "
                  f"{cfg.node.data_dir}")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        try:
            starting = loop.create_task(self._start())
            stopping = loop.create_task(stop.wait())
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():  # a signal during the start: stop what has started
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
                return 0
            stopping.cancel()
            starting.result()  # raises the start's error
            s = self._state
            # One write: the serving process logs to the same stream and must not land
            # between "try it:" and the command.
            _say(cfg, f"tessera: serving {s['identity']} on {s['address']} (mTLS)\n"
                      f"tessera: try it:\n  {grpcurl_command(s)}")
            # node.json last: whoever waits for it finds the lines above already printed.
            self._announced = True
            self._write_state()
            await stop.wait()
            _say(cfg, "tessera: shutting down (health NOT_SERVING, finishing in-flight calls)")
        finally:
            await self._stop()
            self.paths.state_file.unlink(missing_ok=True)
            self.paths.supervisor_state.unlink(missing_ok=True)
        _say(cfg, "tessera: stopped")
        return 0


def _say(cfg: Config, text: str) -> None:
    """A line for the operator: printed for a terminal, one log record with JSON logs."""
    if cfg.log.format == "json":
        log.info("%s", text)
    else:
        print(text, flush=True)


def check_ports_free(cfg: Config) -> None:
    """Raise AddressInUse, naming the port and the fix, when a fixed port is taken.

    Checked before anything starts, so a taken port is one line, not a "configuration
    error" after certificates, migrations and gRPC's own bind log. Port 0 (any free port)
    and addresses this machine cannot bind at all are left to the real bind.
    """
    for setting, flag, address in (
            ("node.listen_address", "--listen or ", cfg.node.listen_address),
            ("node.enroll_listen_address", "", cfg.node.enroll_listen_address),
            ("metrics.listen_address", "", cfg.metrics.listen_address)):
        try:
            host, port = split_host_port(address or "")
        except ValueError:
            continue
        if port == 0:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # As gRPC binds: a port in TIME_WAIT after a stop is free to use.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host or "0.0.0.0", port))  # noqa: S104 - a probe
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise AddressInUse(
                        f"cannot listen on {address}: another process (another node?) "
                        f"already listens there; stop it, or choose a free port with "
                        f"{flag}{setting}") from None


async def serve(cfg: Config, *, log_level: str = "INFO",
                source: ConfigSource | None = None) -> int:
    """Run a node until SIGINT or SIGTERM, then stop it gracefully; the exit code.

    Raises DataDirInUse (naming the holder's pid) when another node runs on the data
    directory, before touching anything in it.
    """
    paths = NodePaths(cfg.node.data_dir)
    prepare_data_dir(paths)
    lock = DataDirLock(paths.lock_file)
    lock.acquire()
    # Until the supervisor handles it: SIGHUP's default would end the node.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        check_ports_free(cfg)
        loaded = cfg
        # Once, here: the serving processes get the name with the rest of the settings.
        cfg = resolve_node_name(cfg)
        try:
            return await Supervisor(cfg, paths, log_level, source, loaded).run()
        except ServingFailed as exc:
            return exc.code if exc.code > 0 else 1
    finally:
        lock.release()


def read_status(paths: NodePaths) -> dict[str, Any] | None:
    """The running supervisor's view of its children, if one runs."""
    try:
        data: dict[str, Any] = json.loads(Path(paths.supervisor_state).read_text())
    except (OSError, ValueError):
        return None
    return data
