"""Agent runs: `agent.spawn` starts one allow-listed program, confined, as an operation.

A peer starting processes on this host is the most dangerous thing a node does, so:

- Only `[agents.<name>]` entries run: an absolute executable, fixed arguments, and the
  caller's values only at declared positions after `--`, each checked against the entry's
  JSON Schema before anything is stored or started. No shell.
- Every agent runs through `agent_wrapper.py` (its own process group, rlimits, the agent
  user, the parent-death signal), with close_fds, an environment of allow-listed names
  only and a working directory outside the data directory (which must be closed to it).
- Runs are capped per grant and per node (RESOURCE_EXHAUSTED), time- and output-limited,
  and each run's process group is recorded so a restarted node kills a leftover group
  that still matches (pgid and start time).
- Spawn, kill and end are audited with caller, grant and agent name.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import datetime as dt
import fcntl
import grp
import json
import logging
import os
import pwd
import re
import secrets
import signal
import stat
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
from google.rpc import code_pb2

from tessera.audit import AuditEntry, AuditWriter
from tessera.commands import agent_wrapper
from tessera.commands._handler import (
    Admission,
    CommandCancelled,
    CommandContext,
    CommandError,
    CommandHandler,
)
from tessera.commands._registry import _violations
from tessera.config import AgentsConfig
from tessera.core.errors import (
    ConfigError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from tessera.grants import GrantStore, PeerState
from tessera.store import Operation, OperationStore

log = logging.getLogger(__name__)

SPAWN = "agent.spawn"
STATUS = "agent.status"
KILL = "agent.kill"
#: How often agent.kill looks whether the run it cancelled has ended.
_KILL_POLL_S = 0.2
_TARGET_SCHEMA = {
    "type": "object", "required": ["operation"], "additionalProperties": False,
    "properties": {"operation": {"type": "string", "pattern": "^operations/[0-9a-f-]{36}$"}}}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_PARAM_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_ENV_RE = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
#: Names never passed to an agent whatever the allow-list says.
_SECRET_ENV = re.compile(r"(^TESSERA_)|KEY|SECRET|TOKEN|PASSWORD|PASSWD|DSN|CREDENTIAL")
_SCALARS = {"string", "integer", "number", "boolean"}
_READ = 65536
#: The JSON-encoded argv rides in one argument of the wrapper, which the kernel caps at
#: 128 KiB (MAX_ARG_STRLEN); longer values are the caller's error, not an exec failure.
_ARGV_MAX = 64 * 1024
#: How often a peer's running agent re-checks that its peer and grant still admit it.
_GRANT_CHECK_S = 2.0
_WRAPPER = Path(agent_wrapper.__file__)
_AUDIT_SERVICE = "tessera.agents"

_ENTRY_KEYS = {"executable", "args", "params", "schema", "env", "cwd", "time_limit_s",
               "output_limit_bytes", "max_per_grant", "max_per_node", "memory_mb",
               "open_files", "processes", "description"}


@dataclass(frozen=True)
class AgentSpec:
    """One allow-listed agent, checked."""

    name: str
    executable: str
    args: tuple[str, ...]
    #: Caller argument names in the order they are placed after `--`.
    params: tuple[str, ...]
    schema: Mapping[str, Any]
    env: tuple[str, ...]
    cwd: str
    time_limit_s: float
    output_limit_bytes: int
    max_per_grant: int
    max_per_node: int
    memory_mb: int
    open_files: int
    processes: int
    description: str = ""
    validator: Any = field(default=None, compare=False)

    def argv(self, values: Mapping[str, Any]) -> list[str]:
        """The exact argv: executable, fixed arguments, `--`, then one argument per
        declared param, in order; an absent value is an empty argument at its position."""
        placed = [_text(values[p]) if p in values else "" for p in self.params]
        return [self.executable, *self.args, "--", *placed]


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        # JSON (and protobuf Struct) numbers arrive as floats: 3.0 is the integer 3.
        return str(int(value))
    return str(value)


@dataclass(frozen=True)
class AgentUser:
    """The account one run executes as."""

    name: str
    uid: int
    gid: int


#: Ids an agent never gets: root, nobody / nogroup, and the "no id" values of 16 bits.
_NEVER_IDS = frozenset({0, 65534, 65535})
#: Where every node on this host claims its runs' uids (one flock per uid).
_HOST_CLAIMS = Path("/run/tessera-agent-uids")
#: Ids above this confuse tools that read them as signed 32-bit numbers.
_MAX_ID = 2**31 - 2


@dataclass(frozen=True)
class UidRange:
    """`agents.uid_range`: each run gets a uid (and the same gid) of its own from here."""

    low: int
    high: int

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self.low <= uid <= self.high

    @property
    def size(self) -> int:
        """How many ids the range holds."""
        return self.high - self.low + 1


def _entry_error(name: str, message: str) -> ConfigError:
    return ConfigError(f"agents.{name}: {message}; fix the [agents.{name}] table")


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def parse_agents(cfg: AgentsConfig, data_dir: Path) -> dict[str, AgentSpec]:
    """Check every `[agents.<name>]` table; ConfigError naming the first wrong one."""
    data = data_dir.resolve()
    specs: dict[str, AgentSpec] = {}
    for name, raw in sorted(cfg.allow.items()):
        if not _NAME_RE.match(name):
            raise _entry_error(name, "the name must be 1-64 of [a-z0-9_-], starting with a letter")
        unknown = sorted(set(raw) - _ENTRY_KEYS)
        if unknown:
            raise _entry_error(name, f"unknown keys {unknown}; expected some of "
                                     f"{sorted(_ENTRY_KEYS)}")
        exe = raw.get("executable")
        if not isinstance(exe, str) or not os.path.isabs(exe):
            raise _entry_error(name, "executable must be an absolute path")
        exe_path = Path(exe).resolve()
        if not exe_path.is_file() or not os.access(exe_path, os.X_OK):
            raise _entry_error(name, f"executable {exe} is not an executable file")
        if _under(exe_path, data):
            raise _entry_error(name, "executable must be outside the data directory")
        fixed = raw.get("args", [])
        if not isinstance(fixed, list) or not all(isinstance(a, str) and "\0" not in a
                                                  for a in fixed):
            raise _entry_error(name, "args must be a list of strings")
        params = raw.get("params", [])
        if not isinstance(params, list) or not all(isinstance(p, str) and _PARAM_RE.match(p)
                                                   for p in params) \
                or len(set(params)) != len(params):
            raise _entry_error(name, "params must be a list of distinct argument names")
        schema = raw.get("schema", {"type": "object", "properties": {}})
        if not isinstance(schema, dict):
            raise _entry_error(name, "schema must be a JSON Schema object")
        schema = _closed_schema(name, schema, params)
        env = raw.get("env", [])
        if not isinstance(env, list) or not all(isinstance(e, str) and _ENV_RE.match(e)
                                                for e in env):
            raise _entry_error(name, "env must be a list of variable names")
        secret = [e for e in env if _SECRET_ENV.search(e)]
        if secret:
            raise _entry_error(name, f"env may not pass {secret} (node settings and secrets)")
        cwd = raw.get("cwd", "/")
        if not isinstance(cwd, str) or not os.path.isabs(cwd) or not Path(cwd).is_dir():
            raise _entry_error(name, "cwd must be an existing absolute directory")
        if _under(Path(cwd).resolve(), data):
            raise _entry_error(name, "cwd must be outside the data directory")
        numbers: dict[str, float] = {}
        for key, default, low in (("time_limit_s", 300.0, 0.1), ("output_limit_bytes", 1 << 20, 1),
                                  ("max_per_grant", 1, 1), ("max_per_node", 4, 1),
                                  ("memory_mb", 1024, 16), ("open_files", 256, 16),
                                  ("processes", 64, 1)):
            value = raw.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < low:
                raise _entry_error(name, f"{key} must be a number of at least {low}")
            numbers[key] = value
        description = raw.get("description", "")
        specs[name] = AgentSpec(
            name=name, executable=str(exe_path), args=tuple(fixed), params=tuple(params),
            schema=schema, env=tuple(env), cwd=cwd, description=str(description),
            time_limit_s=float(numbers["time_limit_s"]),
            output_limit_bytes=int(numbers["output_limit_bytes"]),
            max_per_grant=int(numbers["max_per_grant"]),
            max_per_node=int(numbers["max_per_node"]),
            memory_mb=int(numbers["memory_mb"]), open_files=int(numbers["open_files"]),
            processes=int(numbers["processes"]),
            validator=_Validator(schema, format_checker=_Validator.FORMAT_CHECKER),
        )
    return specs


def _ecma_pattern(validator: Any, pattern: str, instance: Any,
                  schema: Mapping[str, Any]) -> Any:
    r"""`pattern` as JSON Schema means it (ECMA-262): `$` matches only at the very end.

    Python's `$` also matches before a final newline, so "name\n" passed `^[a-z]+$` and
    reached the agent's command line. A value ending in a newline is matched with a NUL
    appended (NUL is refused anyway), which no `$` can match before.

    Likewise `\d` and `\w` are ASCII there ([0-9], [A-Za-z0-9_]); Python's matched any
    Unicode digit or letter ("١٢٣" passed `^\d+$`). re.ASCII makes them (and `\s`, a
    little stricter than ECMA's) ASCII.
    """
    if not validator.is_type(instance, "string"):
        return
    probe = instance + "\0" if instance.endswith("\n") else instance
    if re.search(pattern, probe, re.ASCII) is None:
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


_Validator: Any = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
    jsonschema.Draft202012Validator, {"pattern": _ecma_pattern})


def _closed_schema(name: str, schema: dict[str, Any], params: list[str]) -> dict[str, Any]:
    """The entry's schema, which must describe exactly its params, each a scalar."""
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise _entry_error(name, f"schema is not a valid JSON Schema: {exc.message}") from None
    if schema.get("type") != "object":
        raise _entry_error(name, "schema must have type 'object'")
    props = schema.get("properties", {})
    if set(props) != set(params):
        raise _entry_error(name, "schema properties must be exactly the params")
    for p, sub in props.items():
        kind = sub.get("type") if isinstance(sub, dict) else None
        if not isinstance(kind, str) or kind not in _SCALARS:
            raise _entry_error(name, f"schema property {p} must have a scalar type "
                                     f"({', '.join(sorted(_SCALARS))})")
    # Nothing but the declared values ever reaches the command line.
    return {**schema, "additionalProperties": False}


def _need_root(setting: str) -> None:
    if os.geteuid() != 0:
        raise ConfigError(f"{setting}: switching agents to another uid needs a node started "
                          "as root (it drops privileges only in the agent's wrapper)")


def parse_uid_range(text: str) -> UidRange:
    """`agents.uid_range` as LOW-HIGH; ConfigError unless it is a usable range."""
    low_text, sep, high_text = text.strip().partition("-")
    if not sep or not low_text.strip().isdigit() or not high_text.strip().isdigit():
        raise ConfigError(f"agents.uid_range: {text!r} is not LOW-HIGH (e.g. "
                          "1900000000-1900065535)")
    rng = UidRange(int(low_text), int(high_text))
    if rng.low > rng.high or rng.high > _MAX_ID:
        raise ConfigError(f"agents.uid_range: {text!r} must have LOW <= HIGH <= {_MAX_ID}")
    bad = sorted(i for i in (*_NEVER_IDS, os.geteuid(), os.getegid()) if i in rng)
    if bad:
        raise ConfigError(f"agents.uid_range: {text!r} holds {bad[0]} (root, nobody or the "
                          "node's own id); use ids no account has, e.g. 1900000000-1900065535")
    return rng


def agent_identity(cfg: AgentsConfig) -> UidRange | AgentUser:
    """A uid range (one uid per run) or, with `uid_range` empty, the one shared account."""
    if cfg.uid_range.strip():
        rng = parse_uid_range(cfg.uid_range)
        _need_root("agents.uid_range")
        return rng
    return agent_user(cfg)


def agent_user(cfg: AgentsConfig) -> AgentUser:
    """The configured agent account; ConfigError if missing, root, or the node's own."""
    if not cfg.user:
        raise ConfigError("agents.user: agents.uid_range is empty and no user is set to run "
                          "agents as; set agents.uid_range (one uid per run) or agents.user")
    try:
        pw = pwd.getpwnam(cfg.user)
    except KeyError:
        raise ConfigError(f"agents.user: no account {cfg.user!r} on this host; create it "
                          "(e.g. useradd --system --no-create-home tessera-agent)") from None
    if pw.pw_uid == 0 or pw.pw_gid == 0:
        raise ConfigError(f"agents.user: {cfg.user} is root or in group root; agents never "
                          "run as root")
    if pw.pw_uid == os.geteuid():
        raise ConfigError(f"agents.user: {cfg.user} is the node's own account, which can "
                          "read its keys; use a separate unprivileged account")
    _need_root("agents.user")
    return AgentUser(cfg.user, pw.pw_uid, pw.pw_gid)


def check_data_dir_closed(data_dir: Path, who: UidRange | AgentUser) -> None:
    """ConfigError unless no agent uid or gid can read or enter the data directory."""
    st = data_dir.stat()
    if isinstance(who, UidRange):
        name = f"the uids of agents.uid_range {who.low}-{who.high}"
        readable = st.st_uid in who or bool(st.st_mode & stat.S_IRWXO) \
            or (st.st_gid in who and bool(st.st_mode & stat.S_IRWXG))
    else:
        name = who.name
        readable = st.st_uid == who.uid or bool(st.st_mode & stat.S_IRWXO) \
            or (st.st_gid == who.gid and bool(st.st_mode & stat.S_IRWXG))
    if readable:
        raise ConfigError(f"agents: the data directory {data_dir} is open to {name} "
                          f"(mode {stat.S_IMODE(st.st_mode):o}); make it 0700 and owned by "
                          "the node's account")


def _open_to(st: os.stat_result, who: UidRange | AgentUser, bits: int) -> bool:
    """Whether an agent uid gets `bits` (a mode triple, e.g. 0o4 read) on this inode."""
    if isinstance(who, UidRange):
        if st.st_uid in who:
            return bool(st.st_mode & (bits << 6))
        if st.st_gid in who:
            return bool(st.st_mode & (bits << 3))
    else:
        if st.st_uid == who.uid:
            return bool(st.st_mode & (bits << 6))
        if st.st_gid == who.gid:
            return bool(st.st_mode & (bits << 3))
    return bool(st.st_mode & bits)


def readable_by_agents(path: Path, who: UidRange | AgentUser) -> bool:
    """Whether an agent could read `path`: every directory above it lets an agent in
    and the file lets it read (agents have no supplementary groups)."""
    try:
        real = path.resolve(strict=True)
        if not _open_to(real.stat(), who, 0o4):
            return False
        return all(_open_to(d.stat(), who, 0o1) for d in real.parents)
    except OSError:
        return False


def check_secrets_closed(files: Iterable[tuple[str, str]], who: UidRange | AgentUser) -> None:
    """ConfigError naming the first (setting, file) an agent could read.

    The data directory is checked apart; these are the secrets the configuration keeps
    elsewhere (fixed TLS key, provisioner key and password, the config file when it
    holds the DSN or Valkey URL).
    """
    for setting, name in files:
        if name and readable_by_agents(Path(name), who):
            raise ConfigError(f"agents: {name} ({setting}) is readable by agents; make it "
                              "0600 (or 0640 with a group of the node's) or close a "
                              "directory above it, before agents are allowed")


def replaceable_by_agents(path: Path, who: UidRange | AgentUser) -> bool:
    """Whether an agent could change or replace the file at `path`: write it, or rename
    or unlink it (or a directory on its way) in a directory it may write (a sticky one
    lets only an entry's owner do that)."""
    real = path.resolve()
    if _open_to(real.stat(), who, 0o2):
        return True
    for entry in (real, *real.parents[:-1]):
        parent = entry.parent.stat()
        if not _open_to(parent, who, 0o2):
            continue
        if not parent.st_mode & stat.S_ISVTX:
            return True
        owner = entry.lstat().st_uid
        if (owner in who) if isinstance(who, UidRange) else owner == who.uid:
            return True
    return False


def check_executables_fixed(specs: Mapping[str, AgentSpec], who: UidRange | AgentUser) -> None:
    """ConfigError naming the first agent whose executable an agent could replace: one
    run would then choose what every later run, whoever's, executes."""
    for name, spec in sorted(specs.items()):
        if replaceable_by_agents(Path(spec.executable), who):
            raise _entry_error(name, f"executable {spec.executable} is writable by agents "
                                     "(the file or a directory above it); keep it where "
                                     "only root writes")


def ids_in_use() -> set[int]:
    """Every uid and gid (real, effective, saved, filesystem) of a live process."""
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/status").read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(("Uid:", "Gid:")):
                found.update(int(v) for v in line.split()[1:])
    return found


def _has_entry(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        try:
            grp.getgrgid(uid)
        except KeyError:
            return False
    return True


class UidClaims:
    """Hands out one uid per run from a range, across the node's serving processes.

    A uid is free when no passwd or group entry names it, no live process has it (as any
    of its ids) and no other run on this host holds its claim: an flock on
    `/run/tessera-agent-uids/<uid>`, which the kernel drops when the holder dies. The
    search starts at a random place in the range, so a uid (and any file a run left
    behind) is seldom reused soon.
    """

    #: Uids tried per run before giving up with RESOURCE_EXHAUSTED.
    ATTEMPTS = 256

    def __init__(self, rng: UidRange, directory: Path) -> None:
        self.range = rng
        self.directory = directory
        directory.mkdir(mode=0o700, exist_ok=True)
        st = directory.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() \
                or stat.S_IMODE(st.st_mode) & 0o077:
            raise ConfigError(f"agents.uid_range: {directory} (where runs claim their uids) "
                              "must be a directory of the node's account, mode 0700")

    @classmethod
    def on_host(cls, rng: UidRange, fallback: Path) -> UidClaims:
        """Claims shared by every node on this host (/run, emptied at boot), so two nodes
        with overlapping ranges never hand one uid to two runs; else under `fallback`."""
        if _HOST_CLAIMS.parent.is_dir():
            return cls(rng, _HOST_CLAIMS)
        log.warning("%s does not exist: agent uids are claimed under %s, so another node on "
                    "this host needs a disjoint agents.uid_range", _HOST_CLAIMS.parent,
                    fallback)
        return cls(rng, fallback)

    def claim(self) -> tuple[AgentUser, int]:
        """A free uid and the descriptor holding its claim (close it to release)."""
        busy = ids_in_use()
        start = secrets.randbelow(self.range.size)
        for step in range(min(self.ATTEMPTS, self.range.size)):
            uid = self.range.low + (start + step) % self.range.size
            if uid in busy or _has_entry(uid):
                continue
            path = self.directory / str(uid)
            fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # A released claim is unlinked: a lock on that old file claims nothing.
                if os.stat(path).st_ino != os.fstat(fd).st_ino:
                    raise FileNotFoundError(path)
            except OSError:
                os.close(fd)
                continue
            if uid in ids_in_use():
                # A run of a sibling that ended a moment ago left a process behind.
                os.close(fd)
                continue
            return AgentUser(f"uid {uid}", uid, uid), fd
        raise CommandError("no free uid in agents.uid_range for another agent run; widen "
                           "the range or wait for a run to end",
                           code=code_pb2.RESOURCE_EXHAUSTED, reason="AGENT_NO_UID")

    def sweep(self) -> int:
        """Remove claim files nobody holds (left by a killed node); how many went."""
        removed = 0
        for path in self.directory.iterdir():
            if not path.name.isdigit():
                continue
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    path.unlink()
                    removed += 1
            except OSError:
                pass  # held by a live run, or gone meanwhile
            finally:
                os.close(fd)
        return removed

    def release(self, uid: int, fd: int) -> None:
        """Give a uid back (its file goes first, while still locked, so none piles up)."""
        with contextlib.suppress(OSError):
            os.unlink(self.directory / str(uid))
        os.close(fd)


# -- process groups -------------------------------------------------------------------


def start_ticks(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (/proc/<pid>/stat field 22)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except OSError:
        return None
    return int(text[text.rfind(")") + 2:].split()[19])


def _group(pgid: int, started: int) -> list[int]:
    """Members of group `pgid` that started no earlier than its leader did."""
    out = []
    for pid in agent_wrapper.group_members(pgid):
        ticks = start_ticks(pid)
        if ticks is not None and ticks >= started:
            out.append(pid)
    return out


def kill_group(pgid: int, started: int, sig: int = signal.SIGKILL) -> int:
    """Signal the recorded group if it is still the one recorded; how many got it.

    The leader (pid == pgid) is checked against its start time, so a reused pid is left
    alone; while any member lives, the kernel never reuses the pgid for a new process.
    """
    leader = start_ticks(pgid)
    if leader is not None and leader != started:
        return 0
    hit = 0
    for pid in _group(pgid, started):
        with contextlib.suppress(OSError):
            os.kill(pid, sig)
            hit += 1
    return hit


@dataclass
class _Live:
    spec: AgentSpec
    proc: asyncio.subprocess.Process
    pgid: int
    started: int
    caller: str
    grant: str
    record: Path
    user: AgentUser
    #: The flock holding this run's uid (UidClaims), -1 with the one shared account.
    claim_fd: int = -1
    killed_by: str = ""


class Agents:
    """The agent handler: admission, spawn, streaming, kill, restart cleanup."""

    def __init__(self, cfg: AgentsConfig, specs: Mapping[str, AgentSpec],
                 ids: UidRange | AgentUser, *, runs_dir: Path, operations: OperationStore,
                 auditor: AuditWriter | None, grants: GrantStore | None = None) -> None:
        self.cfg = cfg
        self.grants = grants
        self.specs = dict(specs)
        self.ids = ids
        self.runs_dir = runs_dir
        self.claims = UidClaims.on_host(ids, runs_dir / "uids") \
            if isinstance(ids, UidRange) else None
        self.ops = operations
        self.auditor = auditor
        self._live: dict[str, _Live] = {}
        self._start_lock = asyncio.Lock()
        #: Records of runs an earlier process left (see kill_leftovers), to audit.
        self._leftovers: list[dict[str, Any]] = []

    @classmethod
    def from_config(cls, cfg: AgentsConfig, data_dir: Path, *, operations: OperationStore,
                    auditor: AuditWriter | None,
                    grants: GrantStore | None = None) -> Agents | None:
        """The agent handler, or None when no agent is listed. ConfigError on a bad entry."""
        if not cfg.allow:
            return None
        specs = parse_agents(cfg, data_dir)
        ids = agent_identity(cfg)
        check_data_dir_closed(data_dir, ids)
        check_executables_fixed(specs, ids)
        runs = data_dir / "agents"
        runs.mkdir(mode=0o700, exist_ok=True)
        return cls(cfg, specs, ids, runs_dir=runs, operations=operations, auditor=auditor,
                   grants=grants)

    def handler(self) -> CommandHandler:
        """The `agent.spawn` command type."""
        longest = max(s.time_limit_s for s in self.specs.values())
        return CommandHandler(
            type=SPAWN, run=self.run, on_cancel=self.cancel, admit=self.admit,
            description="Run an allow-listed agent (see `tessera agents list`); "
                        "cancel the operation to kill it.",
            input_schema={
                "type": "object", "required": ["agent"], "additionalProperties": False,
                "properties": {"agent": {"type": "string", "enum": sorted(self.specs)},
                               "args": {"type": "object"}}},
            # The runner's limit is a backstop; each agent has its own time limit.
            timeout_s=longest + self.cfg.kill_grace_s + 30,
            retry_safe=False,
        )

    def handlers(self) -> list[CommandHandler]:
        """`agent.spawn`, and `agent.status` and `agent.kill` on the caller's own runs."""
        return [
            self.handler(),
            CommandHandler(
                type=STATUS, run=self.status, admit=self.admit_target, granted_with=SPAWN,
                input_schema=_TARGET_SCHEMA, timeout_s=30.0, retry_safe=True,
                description="The state of one of the caller's agent runs (operation): "
                            "state, exit status, and pid, pgid and uid while it runs."),
            CommandHandler(
                type=KILL, run=self.kill, admit=self.admit_target, granted_with=SPAWN,
                input_schema=_TARGET_SCHEMA, retry_safe=True,
                timeout_s=self.cfg.kill_grace_s + 60.0,
                description="End one of the caller's agent runs: SIGTERM to its process "
                            "group, SIGKILL after agents.kill_grace_s; the run's final "
                            "state is the output."),
        ]

    async def _target(self, caller: str, grant: str, command_type: str,
                      args: Mapping[str, Any]) -> Operation:
        """The caller's own agent run named by `operation`; NotFound (audited) otherwise:
        another caller's run is indistinguishable from none."""
        name = str(args.get("operation", ""))
        try:
            op = await self.ops.get(name, caller)
            if op.command_type != SPAWN:
                raise NotFound(f"operation {name} is not an agent run")
            if op.forward_peer:  # runs on a peer: read or cancel it (relayed) instead
                raise NotFound(f"operation {name} is an agent run on peer {op.forward_peer}, "
                               "not here; use GetOperation / CancelOperation of it")
        except NotFound:
            await self._audit_entry(
                command_type.removeprefix("agent."), caller, grant, "",
                {"operation": name}, outcome="DENIED_BY_POLICY", status="NOT_FOUND",
                reason="AGENT_RUN_NOT_FOUND")
            raise
        return op

    async def admit_target(self, adm: Admission) -> Mapping[str, Any]:
        """Refuse before anything is stored: the run must be the caller's own."""
        await self._target(adm.caller, adm.grant, adm.command_type, adm.args)
        return {"grant": adm.grant or "(local)"}

    def _describe(self, op: Operation) -> dict[str, Any]:
        """What agent.status answers (to the run's own caller only)."""
        agent = str((op.input or {}).get("agent", ""))
        out: dict[str, Any] = {"operation": op.name, "agent": agent, "state": op.state}
        if op.output is not None and "exit_code" in op.output:
            out["exit_code"] = op.output["exit_code"]
            out["truncated_bytes"] = op.output.get("truncated_bytes", 0)
        if op.error is not None:
            out["error"] = {"code": op.error.code, "reason": op.error.reason,
                            "message": op.error.message}
        if not op.done:
            try:
                rec = json.loads((self.runs_dir / f"{op.uuid}.json").read_text())
                if _alive(rec.get("pgid"), rec.get("start_ticks")):
                    out.update(pid=int(rec["pgid"]), pgid=int(rec["pgid"]),
                               uid=int(rec.get("uid", self._shared_uid())))
            except (OSError, ValueError, KeyError, TypeError):
                pass  # not started yet, or ended a moment ago
        return out

    def _shared_uid(self) -> int:
        return self.ids.uid if isinstance(self.ids, AgentUser) else -1

    async def status(self, ctx: CommandContext) -> Mapping[str, Any]:
        """agent.status: the run as its operation says, with its process while it runs."""
        grant = str((ctx.args.get("_admission") or {}).get("grant", ""))
        op = await self._target(ctx.caller, grant, STATUS, ctx.args)
        return self._describe(op)

    async def kill(self, ctx: CommandContext) -> Mapping[str, Any]:
        """agent.kill: cancel the run (its whole group: SIGTERM, SIGKILL after the grace)
        and wait until it has ended; its final state is the output."""
        grant = str((ctx.args.get("_admission") or {}).get("grant", ""))
        op = await self._target(ctx.caller, grant, KILL, ctx.args)
        if not op.done:
            with contextlib.suppress(FailedPrecondition):  # it ended meanwhile
                await self.ops.request_cancel(op.name, ctx.caller)
        while not op.done:
            if ctx.cancelled.is_set():
                raise CommandCancelled
            await asyncio.sleep(_KILL_POLL_S)
            op = await self.ops.get(op.name, ctx.caller)
        return self._describe(op)

    # -- admission -------------------------------------------------------------------

    def _resolve(self, args: Mapping[str, Any]) -> tuple[AgentSpec, dict[str, Any]]:
        name = str(args.get("agent", ""))
        spec = self.specs.get(name)
        if spec is None:
            raise InvalidArgument([FieldViolation("plugin.args.agent",
                                                  f"{name!r} is not an allow-listed agent")])
        values = args.get("args") or {}
        if not isinstance(values, dict):
            raise InvalidArgument([FieldViolation("plugin.args.args", "must be an object")])
        errors = sorted(spec.validator.iter_errors(values),
                        key=lambda e: [str(p) for p in e.absolute_path])
        if errors:
            found = list(dict.fromkeys(v for e in errors
                                       for v in _violations("plugin.args.args", e)))
            raise InvalidArgument(found[:10])
        bad = [k for k, v in values.items() if "\0" in _text(v)]
        if bad:
            raise InvalidArgument([FieldViolation(f"plugin.args.args.{bad[0]}",
                                                  "may not contain NUL")])
        if len(json.dumps(spec.argv(values))) > _ARGV_MAX:
            longest = max(values, key=lambda k: len(json.dumps(_text(values[k]))),
                          default="")
            raise InvalidArgument([FieldViolation(
                f"plugin.args.args.{longest}" if longest else "plugin.args.args",
                f"makes the agent's command line longer than {_ARGV_MAX} bytes "
                "(JSON-encoded); send a shorter value")])
        return spec, values

    async def admit(self, adm: Admission) -> Mapping[str, Any]:
        """Refuse before anything is stored: unknown agent, bad values, caps reached."""
        spec, _ = self._resolve(adm.args)
        grant_key = adm.grant or "(local)"
        per_grant = await self.ops.count_active(
            SPAWN, {"agent": spec.name, "_admission": {"grant": grant_key}})
        if per_grant >= spec.max_per_grant:
            raise ResourceExhausted(
                f"agent {spec.name}: {per_grant} runs of grant {grant_key} are active "
                f"(max_per_grant {spec.max_per_grant}); wait for one to end",
                retry_after_s=1.0, subject=f"agent:{spec.name}:{grant_key}")
        per_node = await self.ops.count_active(SPAWN, {"agent": spec.name})
        if per_node >= spec.max_per_node:
            raise ResourceExhausted(
                f"agent {spec.name}: {per_node} runs are active on this node "
                f"(max_per_node {spec.max_per_node}); wait for one to end",
                retry_after_s=1.0, subject=f"agent:{spec.name}")
        return {"grant": grant_key}

    # -- running ---------------------------------------------------------------------

    def _env(self, spec: AgentSpec) -> dict[str, str]:
        env = {"PATH": "/usr/bin:/bin", "HOME": spec.cwd, "LANG": "C.UTF-8",
               "TESSERA_AGENT": spec.name}
        for name in spec.env:
            if name in os.environ:
                env[name] = os.environ[name]
        return env

    async def run(self, ctx: CommandContext) -> Mapping[str, Any]:
        """Spawn the agent, stream its output (bounded), return its exit status."""
        try:
            spec, values = self._resolve(ctx.args)
        except InvalidArgument as exc:
            # This node's allow-list differs from the one that admitted the call.
            raise CommandError(str(exc), code=code_pb2.INVALID_ARGUMENT,
                               reason="AGENT_NOT_ALLOWED") from None
        grant = str((ctx.args.get("_admission") or {}).get("grant", ""))
        async with self._start_lock:
            # Execute's check reads the table and two concurrent calls can both pass it;
            # this one, in the process that starts the agent, is exact for its runs.
            self._check_running(spec, grant)
            live = await self._spawn(ctx, spec, values, grant)
        return await self._follow(ctx, live)

    def _check_running(self, spec: AgentSpec, grant: str) -> None:
        mine = [lv for lv in self._live.values() if lv.spec.name == spec.name]
        if sum(1 for lv in mine if lv.grant == grant) >= spec.max_per_grant \
                or len(mine) >= spec.max_per_node:
            raise CommandError(f"agent {spec.name}: its concurrency cap is reached on this "
                               "node; execute again when a run ended",
                               code=code_pb2.RESOURCE_EXHAUSTED, reason="AGENT_CAP")

    async def _spawn(self, ctx: CommandContext, spec: AgentSpec, values: Mapping[str, Any],
                     grant: str) -> _Live:
        """Start the wrapper; record and register the run before anything else awaits."""
        if self.claims is None:
            assert isinstance(self.ids, AgentUser)
            user, claim_fd = self.ids, -1
        else:
            user, claim_fd = self.claims.claim()
        wrapper_spec = {
            "argv": spec.argv(values), "uid": user.uid, "gid": user.gid,
            "parent": os.getpid(),
            "limits": {"cpu": max(1, int(spec.time_limit_s) + 1),
                       "as": spec.memory_mb << 20, "nofile": spec.open_files,
                       "nproc": spec.processes, "fsize": 64 << 20, "core": 0},
        }
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", str(_WRAPPER), json.dumps(wrapper_spec),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, close_fds=True, start_new_session=True,
                env=self._env(spec), cwd=spec.cwd)
        except OSError as exc:
            # Out of fds or processes, or the cwd went away: the node's state, not a bug.
            self._release(user, claim_fd)
            raise CommandError(f"agent {spec.name} could not be started: {exc.strerror}",
                               code=code_pb2.UNAVAILABLE, reason="AGENT_START_FAILED") from None
        except BaseException:
            # Interrupted (node stopping): a uid still used by a process is skipped anyway.
            self._release(user, claim_fd)
            raise
        started = start_ticks(proc.pid) or 0
        key = ctx.operation.removeprefix("operations/")
        record = self.runs_dir / f"{key}.json"
        live = _Live(spec, proc, proc.pid, started, ctx.caller, grant, record, user, claim_fd)
        self._live[ctx.operation] = live
        try:
            record.write_text(json.dumps({
                "pgid": proc.pid, "start_ticks": started, "agent": spec.name,
                "operation": ctx.operation, "uid": user.uid,
                # Who ran it: a restart after a crash audits the run's end for them.
                "caller": ctx.caller, "grant": grant,
                # Which serving process ran it: a sibling's live runs are not leftovers.
                "owner_pid": os.getpid(), "owner_start_ticks": start_ticks(os.getpid())}))
        except OSError:
            self._end(ctx, live)
            raise
        return live

    def _release(self, user: AgentUser, claim_fd: int) -> None:
        if claim_fd >= 0 and self.claims is not None:
            self.claims.release(user.uid, claim_fd)

    def _end(self, ctx: CommandContext, live: _Live) -> None:
        """Whatever ended the run (even an interrupted task): nothing is left of it."""
        if live.proc.returncode is None:
            # The wrapper still runs (the task was interrupted: node stopping, lease
            # lost). Only it can find what left the group (reparented to it): SIGUSR1 makes
            # it kill all of that and exit. SIGKILL to it would hand those to init.
            with contextlib.suppress(ProcessLookupError):
                live.proc.send_signal(signal.SIGUSR1)
            for pid in _group(live.pgid, live.started):
                if pid != live.proc.pid:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
        else:
            kill_group(live.pgid, live.started)
        self._live.pop(ctx.operation, None)
        live.record.unlink(missing_ok=True)
        # Only now that nothing of the run is left may another run get its uid.
        self._release(live.user, live.claim_fd)
        live.claim_fd = -1

    async def _follow(self, ctx: CommandContext, live: _Live) -> Mapping[str, Any]:
        """Stream the run's output (bounded) until it ends; its result or error."""
        spec, proc = live.spec, live.proc
        budget = [spec.output_limit_bytes]
        truncated = [0]
        followed = False
        try:
            await self._audit("spawn", live, ctx.operation, "AGENT_SPAWNED",
                              {"pid": proc.pid, "uid": live.user.uid})
            await ctx.progress(None, f"agent {spec.name} started (pid {proc.pid})")
            readers = [asyncio.create_task(self._pump(s, ctx, budget, truncated))
                       for s in (proc.stdout, proc.stderr) if s is not None]
            reason = await self._wait(live)
            if reason:
                live.killed_by = reason
                if reason != "time limit":
                    await self._audit("kill", live, ctx.operation, "AGENT_KILLED",
                                      {"pid": live.pgid, "killed_by": reason})
                await self._terminate(live)
            # The wrapper reaps the group before it exits, so the pipes close; a process
            # that left the group could hold them open: stop reading after a moment.
            _, pending = await asyncio.wait(readers, timeout=5.0)
            for task in pending:
                task.cancel()
            followed = True
        finally:
            self._end(ctx, live)
            if not followed:
                # Interrupted (node stopping, lease lost): the run ended here all the same,
                # and the audit must say so, not show a spawn that never ended.
                live.killed_by = live.killed_by or "interrupted"
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(self._audit(
                        "end", live, ctx.operation, "AGENT_EXITED",
                        {"agent": spec.name, "exit_code": -1,
                         "output_bytes": spec.output_limit_bytes - budget[0],
                         "truncated_bytes": truncated[0], "killed_by": live.killed_by}))
        code = proc.returncode if proc.returncode is not None else -1
        result: dict[str, Any] = {"agent": spec.name, "exit_code": code,
                                  "output_bytes": spec.output_limit_bytes - budget[0],
                                  "truncated_bytes": truncated[0]}
        await self._audit("end", live, ctx.operation, "AGENT_EXITED",
                          {**result, "killed_by": live.killed_by})
        if truncated[0]:
            await ctx.output(f"\n[tessera: output truncated, {truncated[0]} bytes dropped]\n")
        if live.killed_by == "cancel" or ctx.cancelled.is_set():
            raise CommandCancelled
        if live.killed_by == "grant":
            raise CommandError(f"agent {spec.name} was killed: its caller's peer or grant "
                               "no longer admits it", code=code_pb2.PERMISSION_DENIED,
                               reason="AGENT_GRANT_REVOKED")
        if live.killed_by == "time limit":
            raise CommandError(f"agent {spec.name} exceeded its time limit of "
                               f"{spec.time_limit_s:g} s and was killed",
                               code=code_pb2.DEADLINE_EXCEEDED, reason="AGENT_TIMEOUT")
        if code != 0:
            raise CommandError(f"agent {spec.name} exited with status {code}",
                               code=code_pb2.ABORTED, reason="AGENT_EXIT_STATUS")
        return result

    async def _wait(self, live: _Live) -> str:
        """Wait for the run to end: "" when it did, "time limit" when its time ran out,
        "grant" when its peer caller's grant was revoked or its peer suspended."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + live.spec.time_limit_s
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return "time limit"
            try:
                await asyncio.wait_for(asyncio.shield(live.proc.wait()),
                                       min(left, _GRANT_CHECK_S))
                return ""
            except TimeoutError:
                pass
            if not await self._still_granted(live):
                return "grant"

    async def _still_granted(self, live: _Live) -> bool:
        """False once a peer caller's grant is revoked (or replaced) or its peer is no
        longer active; a local caller, or a store that cannot answer, keeps the run."""
        if self.grants is None or live.grant in ("", "(local)"):
            return True
        try:
            found = await self.grants.admission(live.caller)
        except Exception as exc:
            log.warning("agent %s: grant not re-checked: %s", live.spec.name,
                        type(exc).__name__)
            return True
        return (found.peer is not None and found.peer.state is PeerState.ACTIVE
                and found.grant is not None and found.grant.name == live.grant
                and found.grant_live)

    async def _pump(self, stream: asyncio.StreamReader, ctx: CommandContext,
                    budget: list[int], truncated: list[int]) -> None:
        """Forward a stream up to the shared budget; drain (and count) the rest."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            data = await stream.read(_READ)
            if not data:
                break
            keep = data[:max(0, budget[0])]
            budget[0] -= len(keep)
            truncated[0] += len(data) - len(keep)
            if keep:
                await ctx.output(decoder.decode(keep))
        tail = decoder.decode(b"", final=True)
        if tail:
            await ctx.output(tail)

    async def _terminate(self, live: _Live) -> None:
        """SIGTERM the group; after the grace, the wrapper kills everything it holds
        (SIGUSR1); SIGKILL to the group is the backstop."""
        kill_group(live.pgid, live.started, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(live.proc.wait()), self.cfg.kill_grace_s)
        if live.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                live.proc.send_signal(signal.SIGUSR1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(live.proc.wait()), 2.0)
        kill_group(live.pgid, live.started, signal.SIGKILL)

    async def cancel(self, ctx: CommandContext) -> None:
        """The operation's cancel hook: end the whole process group."""
        live = self._live.get(ctx.operation)
        if live is None:
            return
        live.killed_by = "cancel"
        await self._audit("kill", live, ctx.operation, "AGENT_KILLED", {"pid": live.pgid})
        await self._terminate(live)

    async def _audit(self, what: str, live: _Live, operation: str, reason: str,
                     detail: Mapping[str, Any]) -> None:
        await self._audit_entry(what, live.caller, live.grant, live.spec.name,
                                {"agent": live.spec.name, "operation": operation, **detail},
                                reason=reason)

    async def _audit_entry(self, what: str, caller: str, grant: str, agent: str,
                           detail: Mapping[str, Any], *, reason: str,
                           outcome: str = "ALLOWED", status: str = "OK") -> bool:
        """Append one audit record; False when the audit log did not take it."""
        if self.auditor is None:
            return True
        entry = AuditEntry(
            time=dt.datetime.now(dt.UTC), identity=caller, peer="",
            grant="" if grant == "(local)" else grant, service=_AUDIT_SERVICE,
            method=what, kind=agent, query_hash="", outcome=outcome,
            status_code=status, bytes_out=0, latency_us=0, trace_id="", reason=reason,
            detail=dict(detail))
        try:
            await self.auditor.record_entry(entry)
        except Exception as exc:
            log.warning("agent %s audit record not written: %s", what, type(exc).__name__)
            return False
        return True

    # -- after a crash ---------------------------------------------------------------

    def kill_leftovers(self) -> int:
        """Kill groups recorded by an earlier process of this node that still match."""
        killed = kill_leftovers(self.runs_dir, ended=self._leftovers)
        if self.claims is not None:
            self.claims.sweep()
        return killed

    async def audit_leftovers(self) -> None:
        """Audit the end of each run kill_leftovers found: its node died while it ran,
        so nothing else writes that the run ended."""
        ended, self._leftovers = self._leftovers, []
        for rec in ended:
            agent = str(rec.get("agent", ""))
            if await self._audit_entry(
                    "end", str(rec.get("caller", "")), str(rec.get("grant", "")), agent,
                    {"agent": agent, "operation": rec.get("operation", ""), "exit_code": -1,
                     "killed_by": "node died", "uid": rec.get("uid")},
                    reason="AGENT_EXITED"):
                # Only once audited: a process killed before leaves it to the next start.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(str(rec["_path"]))
            os.close(int(rec["_fd"]))


def _alive(pid: Any, ticks: Any) -> bool:
    """Whether process `pid` started at `ticks` still runs. A zombie does not: a killed
    serving process whose parent died stays one until init reaps it, and its runs are
    leftovers all the same."""
    try:
        if pid is None or start_ticks(int(pid)) != int(ticks):
            return False
        text = Path(f"/proc/{int(pid)}/stat").read_text(errors="replace")
    except (TypeError, ValueError, OSError):
        return False
    return text[text.rfind(")") + 2:].split()[0] not in ("Z", "X")


#: How long a starting process waits for a sibling that is auditing a leftover run.
_LEFTOVER_LOCK_S = 10.0


def _lock_record(record: Path) -> int | None:
    """An fd holding an flock on `record`, or None when the record is gone (a sibling
    audited it). Waits while a sibling holds it: it audits the run, or dies and the
    kernel drops its lock, and then this process does it."""
    try:
        fd = os.open(record, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    deadline = time.monotonic() + _LEFTOVER_LOCK_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                return None
            time.sleep(0.05)
    try:
        if os.stat(record).st_ino == os.fstat(fd).st_ino:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def kill_leftovers(runs_dir: Path, *, ended: list[dict[str, Any]] | None = None) -> int:
    """SIGKILL every recorded agent group still alive (pgid and start time match) whose
    serving process is gone; a live sibling serving process's runs are left alone.

    Without `ended` a handled record is removed. With it, the record stays, locked
    (flock; of serving processes starting together one audits, the others then find it
    gone) and is appended to `ended` with "_path" and "_fd": the caller audits the run's
    end, then removes the record and closes the fd. A process that dies before its audit
    leaves the record, unlocked, to the next.
    """
    killed = 0
    if not runs_dir.is_dir():
        return 0
    for record in sorted(runs_dir.glob("*.json")):
        try:
            rec = json.loads(record.read_text())
            pgid, started = int(rec["pgid"]), int(rec["start_ticks"])
        except (OSError, ValueError, KeyError, TypeError):
            record.unlink(missing_ok=True)
            continue
        if rec.get("owner_pid") != os.getpid() \
                and _alive(rec.get("owner_pid"), rec.get("owner_start_ticks")):
            continue
        hit = kill_group(pgid, started)
        if hit:
            log.warning("killed %d leftover process(es) of agent %s (%s)", hit,
                        rec.get("agent"), rec.get("operation"))
            killed += hit
        if ended is None:
            record.unlink(missing_ok=True)
            continue
        fd = _lock_record(record)
        if fd is not None and isinstance(rec, dict):
            ended.append({**rec, "_path": str(record), "_fd": fd})
        elif fd is not None:
            os.close(fd)
    return killed
