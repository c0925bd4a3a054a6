"""The agent wrapper: confines itself, then runs one allow-listed agent and reaps its group.

Started by the node as `python -I -S <this file> <spec json>` with close_fds,
start_new_session (so it leads a new process group), a minimal environment and the agent's
working directory. Standard library only: it never imports tessera (the node's code and
settings are none of the agent's business). In this process, before the agent runs:

1. resource limits (CPU seconds, address space, open files, processes, file size);
2. drop to the agent user: setgroups([]), setgid, setuid — refused if that user is root;
3. PR_SET_PDEATHSIG (after the uid change, which would clear it): when the node dies the
   kernel signals this wrapper, which SIGKILLs its whole process group;
4. become a child subreaper, fork the agent (execv of the absolute executable, no shell),
   wait for it, then SIGKILL whatever the agent left in the group or reparented here
   (setsid and double forks included), and exit with the agent's status (128 + signal
   when it was killed). SIGUSR1 (the node's "give up" and the parent-death signal) does
   the same kill at once.

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
WRAPPER_FAILED = 126


def group_members(pgid: int) -> list[int]:
    """Pids in process group `pgid` (from /proc), excluding this process."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and int(fields[2]) == pgid:
            found.append(int(entry))
    return found


def children_of(ppid: int) -> list[int]:
    """Pids whose parent is `ppid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == ppid:
            found.append(int(entry))
    return found


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


def confine(spec: dict[str, object]) -> None:
    """Limits, then the agent user, then the parent-death signal."""
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
    if os.getuid() != uid or os.geteuid() != uid:
        _fail("could not drop privileges")
    # The uid change clears the parent-death signal, so it is set only now.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGUSR1, 0, 0, 0) != 0:
        _fail("prctl(PR_SET_PDEATHSIG) failed")
    # Descendants that leave the group (setsid, double fork) are reparented here, not
    # to init, so the wrapper still finds and kills them.
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        _fail("prctl(PR_SET_CHILD_SUBREAPER) failed")
    # The node may have died before the signal was armed.
    if os.getppid() != int(str(spec["parent"])):
        os._exit(WRAPPER_FAILED)


def main() -> None:
    """Confine, run the agent, reap its group, exit with its status."""
    try:
        spec = json.loads(sys.argv[1])
        argv = [str(a) for a in spec["argv"]]
        confine(spec)
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
            os.execv(argv[0], argv)  # noqa: S606 - no shell, by design
        except OSError as exc:
            sys.stderr.write(f"agent wrapper: cannot execute {argv[0]}: {exc.strerror}\n")
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
