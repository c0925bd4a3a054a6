"""Child processes that die with their parent, and stopping processes we did not start."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent(parent: int, sig: int) -> Callable[[], None]:
    """A preexec_fn: the child gets `sig` when the process that spawned it dies.

    It runs after the uid switch (subprocess applies `user=` first), because a change of
    credentials clears the parent-death signal. The parent may have died before the call:
    then the child signals itself, as the kernel would have.
    """
    def preexec() -> None:
        _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


def _group_of(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_gid


def spawn(argv: list[str], *, death_signal: int, log_path: Path | None = None,
          user: str | None = None, pass_fds: tuple[int, ...] = (),
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a child in its own session (a terminal's Ctrl-C reaches only the parent) that
    receives `death_signal` if this process dies, even by SIGKILL.

    Call it from the main thread: the kernel sends the signal when the spawning *thread*
    ends.
    """
    log = log_path.open("ab") if log_path is not None else None
    try:
        return subprocess.Popen(  # noqa: S603 - argv is built by this package, never a shell
            argv, stdin=subprocess.DEVNULL,
            stdout=log if log is not None else None,
            stderr=subprocess.STDOUT if log is not None else None,
            start_new_session=True, user=user, pass_fds=pass_fds, env=env,
            # With `user`, its own group and no other: root's groups stayed otherwise.
            group=_group_of(user) if user is not None else None,
            extra_groups=[] if user is not None else None,
            preexec_fn=_die_with_parent(os.getpid(), death_signal),
        )
    finally:
        if log is not None:
            log.close()


def pid_alive(pid: int) -> bool:
    """Whether `pid` names a running process (a zombie counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the command name, which is in parentheses and may contain spaces.
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def cmdline(pid: int) -> bytes:
    """The command line of `pid` (empty if it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def stop_pid(pid: int, sig: int, timeout_s: float) -> bool:
    """Send `sig` to a process that is not our child, wait for it to go, then SIGKILL it.

    Returns False if it was already gone.
    """
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout_s
        time.sleep(0.02)
    return True


async def wait_exit(proc: subprocess.Popen[bytes]) -> int:
    """Wait, without a thread or polling, until a child exits; its exit code.

    A pidfd becomes readable when the process ends.
    """
    if proc.poll() is not None:
        return proc.returncode
    loop = asyncio.get_running_loop()
    fd = os.pidfd_open(proc.pid)  # Linux 5.3 or later

    def exited() -> None:
        if not done.done():
            done.set_result(None)

    done: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, exited)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return proc.wait()


def terminate(proc: subprocess.Popen[bytes], sig: int, timeout_s: float) -> None:
    """Stop a child with `sig`; SIGKILL it if it outlives `timeout_s`."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def describe_exit(code: int) -> str:
    """'exit code 1' or 'signal SIGKILL'."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
