"""The agent wrapper: confines itself, then runs one allow-listed agent and reaps its group.

Started by the node as `python -I -S <this file> <spec json>` with close_fds (and it
closes every descriptor above stderr itself first, as not every event loop honours
close_fds), start_new_session (so it leads a new process group), a minimal environment
and the agent's working directory. Standard library only: it never imports tessera (the
node's code and settings are none of the agent's business).

1. The wrapper arms PR_SET_PDEATHSIG (when the node dies the kernel signals it, and it
   kills everything of the run) and PR_SET_CHILD_SUBREAPER (descendants that leave the
   group, by setsid or a double fork, are reparented to it, not to init).
2. It forks the agent. In the child, before execv of the absolute executable (no shell):
   resource limits (CPU seconds, address space, open files, processes, file size), then
   setgroups([]), setgid, setuid to the agent user (refused for root), then
   PR_SET_NO_NEW_PRIVS (setuid and file-capability bits do nothing for the agent).
3. The wrapper keeps the node's account, so the agent cannot kill, stop or trace it. It
   waits for the agent, then SIGKILLs whatever is left in the group or reparented to it,
   and exits with the agent's status (128 + signal when it was killed). SIGUSR1 (the
   parent-death signal, or the node giving up after the kill grace) does the same kill
   at once.

Exit codes of the wrapper itself: 126 = it could not confine itself or exec the agent
(one line on stderr says why).
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
WRAPPER_FAILED = 126


def _processes() -> list[tuple[int, list[str]]]:
    """(pid, the stat fields after the command name) of every process in /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        found.append((int(entry), stat[stat.rfind(")") + 2:].split()))
    return found


def group_members(pgid: int) -> list[int]:
    """Pids in process group `pgid` (from /proc), excluding this process."""
    me = os.getpid()
    return [pid for pid, fields in _processes()
            if pid != me and len(fields) > 2 and int(fields[2]) == pgid]


def children_of(ppid: int) -> list[int]:
    """Pids whose parent is `ppid` (from /proc)."""
    return [pid for pid, fields in _processes() if len(fields) > 1 and int(fields[1]) == ppid]


def kill_group_except_me() -> None:
    """SIGKILL every other member of this process group, and every process that left
    the group but was reparented to this wrapper (a subreaper), until none is left."""
    pgid = os.getpgid(0)
    me = os.getpid()
    for _ in range(100):
        members = sorted(set(group_members(pgid)) | set(children_of(me)))
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        # Killed children must be reaped or they stay listed as zombies.
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass


def _fail(message: str) -> None:
    sys.stderr.write(f"agent wrapper: {message}\n")
    sys.stderr.flush()
    os._exit(WRAPPER_FAILED)


def arm(spec: dict[str, object]) -> None:
    """In the wrapper (which keeps the node's account): the parent-death signal and the
    subreaper role, then make sure the node did not die before they were armed."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGUSR1, 0, 0, 0) != 0:
        _fail("prctl(PR_SET_PDEATHSIG) failed")
    # Descendants that leave the group (setsid, double fork) are reparented here, not
    # to init, so the wrapper still finds and kills them.
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        _fail("prctl(PR_SET_CHILD_SUBREAPER) failed")
    if os.getppid() != int(str(spec["parent"])):
        os._exit(WRAPPER_FAILED)


def confine(spec: dict[str, object]) -> None:
    """In the forked child, before exec: limits, then the agent user for good."""
    limits = spec.get("limits", {})
    assert isinstance(limits, dict)
    for name, value in limits.items():
        which = getattr(resource, f"RLIMIT_{name.upper()}")
        resource.setrlimit(which, (int(value), int(value)))
    uid, gid = int(str(spec["uid"])), int(str(spec["gid"]))
    if uid == 0 or gid == 0:
        _fail("refusing to run an agent as root")
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getgroups() not in ([], [gid]):
        _fail("could not drop privileges")
    # setuid cleared the parent-death signal; the agent gets SIGKILL if the wrapper dies.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # No exec of the agent or its descendants gains privileges: a setuid file another run
    # planted (e.g. in /tmp, setuid to its own uid) would otherwise hand over that run's
    # uid, and with it the power to signal, trace and read whichever run draws it next.
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        _fail("prctl(PR_SET_NO_NEW_PRIVS) failed")


def main() -> None:
    """Arm, fork the confined agent, reap everything it leaves, exit with its status.

    The wrapper itself keeps the node's account (root): the agent cannot signal, stop
    or trace it, so the cleanup below always runs.
    """
    # Nothing the node had open reaches the agent, whatever started this process: uvloop's
    # subprocess support does not honour close_fds, and a descriptor inherited here (a
    # pipe to the supervisor, a socket) would be the agent's too.
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    try:
        spec = json.loads(sys.argv[1])
        argv = [str(a) for a in spec["argv"]]
        arm(spec)
    except SystemExit:
        raise
    except Exception as exc:
        _fail(f"{type(exc).__name__}: {exc}")

    def node_died(signum: int, frame: object) -> None:
        # The node died (parent-death signal) or gave up waiting (kill after the grace).
        kill_group_except_me()
        os._exit(128 + signal.SIGKILL)

    signal.signal(signal.SIGUSR1, node_died)
    # SIGTERM to the group is meant for the agent; the wrapper waits for it to end.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pid = os.fork()
    if pid == 0:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGUSR1, signal.SIG_DFL)
            confine(spec)
            os.execv(argv[0], argv)  # noqa: S606 - no shell, by design
        except OSError as exc:
            sys.stderr.write(f"agent wrapper: cannot execute {argv[0]}: {exc.strerror}\n")
            sys.stderr.flush()
        except Exception as exc:
            sys.stderr.write(f"agent wrapper: {type(exc).__name__}: {exc}\n")
            sys.stderr.flush()
        os._exit(WRAPPER_FAILED)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    kill_group_except_me()
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    main()
