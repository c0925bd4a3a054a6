"""Memory of processes, read from /proc (Linux): peak and current RSS, proportional share."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def _status_kb(pid: int, field: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _pss_kb(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return None


def children(pid: int) -> list[int]:
    """All descendants of `pid`, from each process's parent pid in /proc/<pid>/stat."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; the fields after it do not.
        parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found.extend(kids)
        frontier.extend(kids)
    return found


def cmdline(pid: int) -> str:
    """The process's command line, or '' once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@dataclass(frozen=True)
class GroupMemory:
    """Memory of a group of processes (one server and its workers), in kB."""

    label: str
    pids: tuple[int, ...]
    #: Largest VmHWM (peak resident set) of any one process of the group.
    peak_rss_kb: int
    #: Sum of VmRSS now; counts shared memory once per process that maps it.
    rss_kb: int
    #: Sum of Pss now; shared memory divided among the processes that map it.
    pss_kb: int


def group_memory(label: str, pids: list[int]) -> GroupMemory:
    """Read the memory of `pids` (those already gone are skipped)."""
    live = [p for p in pids if alive(p)]
    return GroupMemory(
        label=label,
        pids=tuple(live),
        peak_rss_kb=max((_status_kb(p, "VmHWM") or 0 for p in live), default=0),
        rss_kb=sum(_status_kb(p, "VmRSS") or 0 for p in live),
        pss_kb=sum(_pss_kb(p) or 0 for p in live),
    )


_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds the process has used, or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    # After the command name: state is field 3 of stat, utime 14 and stime 15.
    return (int(fields[11]) + int(fields[12])) * _TICK_S


@dataclass(frozen=True)
class CpuGroup:
    """A process whose CPU time a measurement reports, with its descendants if `tree`."""

    name: str
    pid: int
    tree: bool = False

    def snapshot(self) -> dict[int, float]:
        """CPU seconds per pid of the group now."""
        pids = [self.pid, *children(self.pid)] if self.tree else [self.pid]
        return {p: t for p in pids if (t := cpu_s(p)) is not None}

    @staticmethod
    def parse(text: str) -> CpuGroup:
        """'name=pid' or 'name=pid+' (with descendants)."""
        name, _, pid = text.partition("=")
        return CpuGroup(name, int(pid.rstrip("+")), pid.endswith("+"))

    def format(self) -> str:
        """Inverse of parse."""
        return f"{self.name}={self.pid}{'+' if self.tree else ''}"


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two snapshots (processes started in between count whole)."""
    return sum(t - before.get(p, 0.0) for p, t in after.items())
