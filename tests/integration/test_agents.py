"""Agent runs (`agent.spawn`) against real node processes, real agents and a real user.

The node runs as root here (as in CI), so the fixture creates the unprivileged account
`tessera-agent` when it is missing. Each node's data directory sits in a directory the
agent may traverse (0711) next to a world-readable control file: the example agent
(examples/agents/probe.sh) reads the control file but not the node's key, so "denied"
means the data directory kept it out, not that the path was unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psycopg
import pytest
from google.protobuf import struct_pb2

from tessera.commands import kill_leftovers
from tessera.commands.agent_wrapper import children_of, group_members
from tessera_client.pb import admin_pb2, command_pb2, resources_pb2
from tests.fixtures.calls import bad_fields, run_cli
from tests.fixtures.nodes import TEST_DIMENSION, NodeProcess
from tests.fixtures.pg import new_database

#: Agent runs are host-wide (uids, processes): one such test at a time across pytest-xdist
#: workers (tests/conftest.py), so "no agent process is left" sees only this test's.
pytestmark = pytest.mark.agents

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "examples" / "agents" / "probe.sh"
AGENT_USER = "tessera-agent"
#: The default agents.uid_range: the fixture's nodes leave it as it comes.
AGENT_UIDS = range(1_900_000_000, 1_900_065_536)
DEADLINE_S = 60.0
FAST = {
    "TESSERA_OPERATIONS_LEASE_TTL_S": "2",
    "TESSERA_OPERATIONS_SWEEP_INTERVAL_S": "0.3",
    "TESSERA_OPERATIONS_CLAIM_GRACE_S": "1",
    "TESSERA_OPERATIONS_CANCEL_GRACE_S": "3",
}
#: What an agent's environment may hold: the node's minimal set and what sh adds.
ALLOWED_ENV = {"PATH", "HOME", "LANG", "TESSERA_AGENT", "PWD", "SHLVL", "_", "OLDPWD"}


@pytest.fixture(scope="session")
def agent_user() -> pwd.struct_passwd:
    """The unprivileged agent account (created when missing; tests run as root)."""
    if os.geteuid() != 0:
        pytest.fail("agent tests need root: the node switches agents to another user")
    try:
        return pwd.getpwnam(AGENT_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", AGENT_USER], check=True)
        return pwd.getpwnam(AGENT_USER)


def _toml(value: Any) -> str:
    return json.dumps(value)


def _schema() -> str:
    return ('{ type = "object", properties = { name = { type = "string", pattern = '
            '"^[a-z]{1,20}$" }, lines = { type = "integer", minimum = 0, maximum = 100000 }, '
            'seconds = { type = "integer", minimum = 0, maximum = 600 } } }')


@pytest.fixture
def agent_node(agent_user: pwd.struct_passwd, pg_server: str,
               valkey_url: str) -> Iterator[Callable[..., NodeProcess]]:
    """Start nodes whose allow-list holds the example agent twice: `probe`, and `chatty`
    with a 2000-byte output limit."""
    base = Path(tempfile.mkdtemp(prefix="tessera-agents-", dir="/tmp"))
    base.chmod(0o711)
    work = base / "work"
    work.mkdir(mode=0o755)
    control = base / "control.txt"
    control.write_text("readable by anyone\n")
    control.chmod(0o644)
    nodes: list[NodeProcess] = []

    def make(*, max_per_grant: int = 1, dsn: str | None = None, extra: str = "",
             start: bool = True, shared_user: bool = False) -> NodeProcess:
        data = base / f"data-{len(nodes)}"
        config = base / f"tessera-{len(nodes)}.toml"
        fixed = _toml(["--try-read", str(data / "pki" / "node.key"), "--try-read", str(control),
                       "--try-signal-parent"])
        common = (f"executable = {_toml(str(PROBE))}\n"
                  f"params = [\"name\", \"lines\", \"seconds\"]\n"
                  f"schema = {_schema()}\n"
                  f"env = [\"LANG\"]\ncwd = {_toml(str(work))}\n")
        config.write_text(
            # By default one uid per run (agents.uid_range as it comes); shared_user
            # runs every agent as the one account, the configuration before uid ranges.
            "[agents]\n" + (f"uid_range = \"\"\nuser = {_toml(AGENT_USER)}\n" if shared_user
                            else "") + "kill_grace_s = 2\n\n"
            
            f"[agents.probe]\n{common}"
            f"args = {fixed}\n"
            f"time_limit_s = 120\noutput_limit_bytes = 100000\n"
            f"max_per_grant = {max_per_grant}\nmax_per_node = 4\n\n"
            f"[agents.chatty]\n{common}output_limit_bytes = 2000\nmax_per_grant = 2\n\n"
            f"[agents.brief]\n{common}time_limit_s = 1\n\n"
            # An agent that leaves its process group and session at once.
            f"[agents.escape]\nexecutable = \"/usr/bin/setsid\"\n"
            f"args = [\"-f\", \"/bin/sleep\", \"300\"]\ncwd = {_toml(str(work))}\n{extra}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
        env.update(FAST)
        env.update({"TESSERA_NODE_NAME": "tessera", "TESSERA_CONFIG": str(config),
                    "TESSERA_STORE_EMBEDDING_DIMENSION": str(TEST_DIMENSION),
                    "TESSERA_STORE_DSN": dsn or new_database(pg_server),
                    "TESSERA_VALKEY_URL": valkey_url,
                    # A secret-looking variable the agent must never see.
                    "AGENT_TEST_CANARY_SECRET": "s3cr3t"})
        node = NodeProcess(data, env, base / f"node-{len(nodes)}.log")
        nodes.append(node)
        if start:
            node.start()
        return node

    yield make
    for node in nodes:
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
            try:
                node.proc.wait(30)
            except subprocess.TimeoutExpired:
                node.proc.kill()
    if not os.environ.get("KEEP_AGENT_TEST_DIR"):
        shutil.rmtree(base, ignore_errors=True)


def spawn(key: str, agent: str, **args: Any) -> command_pb2.ExecuteRequest:
    s = struct_pb2.Struct()
    s.update({"agent": agent, "args": args})
    return command_pb2.ExecuteRequest(
        idempotency_key=key, plugin=command_pb2.PluginCommand(type="agent.spawn", args=s))


def sql(node: NodeProcess, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(node.env["TESSERA_STORE_DSN"], autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def output_of(node: NodeProcess, name: str) -> str:
    rows = sql(node, "SELECT data->>'text' FROM events WHERE kind = 'operation' AND "
                     "resource_id = %s AND type = 'operation.output' ORDER BY sequence",
               (name.removeprefix("operations/"),))
    return "".join(r[0] or "" for r in rows)


def uids_of(pid: int) -> set[int]:
    """Every uid (real, effective, saved, filesystem) of a process; empty when gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return set()
    line = next(ln for ln in text.splitlines() if ln.startswith("Uid:"))
    return {int(v) for v in line.split()[1:]}


def agent_processes() -> list[int]:
    """Pids running as an agent: a uid of the default range or the shared account."""
    shared = pwd.getpwnam(AGENT_USER).pw_uid
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            uids = uids_of(int(entry))
            if shared in uids or any(u in AGENT_UIDS for u in uids):
                found.append(int(entry))
    return found


async def until(probe: Callable[[], Awaitable[T | None]], what: str) -> T:
    end = time.monotonic() + DEADLINE_S
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def done_op(node: NodeProcess, name: str) -> command_pb2.Operation:
    async with node.client() as c:
        async def probe() -> command_pb2.Operation | None:
            op = await c.command.GetOperation(command_pb2.GetOperationRequest(name=name))
            return op if op.done else None

        return await until(probe, f"{name} to finish")


async def recorded_group(node: NodeProcess, name: str) -> int:
    """The pgid the node recorded for a running agent (from data_dir/agents)."""
    record = node.data_dir / "agents" / f"{name.removeprefix('operations/')}.json"

    async def probe() -> int | None:
        try:
            return int(json.loads(record.read_text())["pgid"])
        except (OSError, ValueError, KeyError):
            return None

    pgid = await until(probe, f"{name} to record its process group")
    # Wait until the agent itself runs (the wrapper forked and dropped privileges).
    await until(lambda: _async(len(group_members(pgid)) >= 2 or None),
                f"the agent to start; it printed {output_of(node, name)!r}")
    return pgid


async def _async(value: T) -> T:
    return value


async def gone(pgid: int, what: str) -> None:
    await until(lambda: _async(not group_members(pgid) or None), what)


# -- refused before anything starts ---------------------------------------------------


async def test_only_allow_listed_agents_and_schema_values_are_accepted_and_nothing_starts(
        agent_node: Callable[..., NodeProcess], agent_user: pwd.struct_passwd) -> None:
    node = agent_node()
    refused = [
        (spawn("k1", "bash", name="x"), "plugin.args.agent"),
        (spawn("k2", "../../bin/sh"), "plugin.args.agent"),
        (spawn("k3", "probe", name="Robert'); rm -rf /"), "plugin.args.args.name"),
        (spawn("k4", "probe", lines="10; id"), "plugin.args.args.lines"),
        (spawn("k5", "probe", executable="/bin/sh"), "plugin.args.args"),
        (spawn("k6", "probe", lines=100001), "plugin.args.args.lines"),
    ]
    async with node.client() as c:
        for request, field in refused:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.command.Execute(request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
            assert field in bad_fields(err.value), (request, err.value.details())
        # An extra top-level key (e.g. naming a program) is refused by the type's schema.
        s = struct_pb2.Struct()
        s.update({"agent": "probe", "executable": "/bin/sh"})
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.command.Execute(command_pb2.ExecuteRequest(
                idempotency_key="k7", plugin=command_pb2.PluginCommand(type="agent.spawn",
                                                                        args=s)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sql(node, "SELECT count(*) FROM operations")[0][0] == 0
    assert not list((node.data_dir / "agents").glob("*.json"))
    assert agent_processes() == []


def test_a_wrong_allow_list_entry_stops_the_start_with_one_line_naming_it(
        agent_node: Callable[..., NodeProcess]) -> None:
    node = agent_node(extra='\n[agents.broken]\nexecutable = "probe.sh"\n', start=False)
    done = subprocess.run(
        [sys.executable, "-m", "tessera.cli", "serve", "--data-dir", str(node.data_dir),
         "--listen", "127.0.0.1:0"], env=node.env, capture_output=True, text=True,
        timeout=DEADLINE_S, check=False)
    assert done.returncode != 0
    said = [ln for ln in (done.stdout + done.stderr).splitlines() if "agents.broken" in ln]
    assert len(said) == 1 and "executable must be an absolute path" in said[0], said
    assert not (node.data_dir / "node.json").exists()


# -- isolation, output, audit -----------------------------------------------------------


async def test_an_agent_runs_as_the_agent_user_without_the_nodes_keys_or_environment(
        agent_node: Callable[..., NodeProcess], agent_user: pwd.struct_passwd) -> None:
    node = agent_node()
    key_file = node.data_dir / "pki" / "node.key"
    assert key_file.read_bytes()  # the node's key is there (root reads it)
    assert (node.data_dir.stat().st_mode & 0o777) == 0o700
    async with node.client() as c:
        op = await c.command.Execute(spawn("probe-1", "probe", name="tessera", lines=2))
    final = await done_op(node, op.name)
    assert final.state == command_pb2.OPERATION_STATE_SUCCEEDED, final
    out = output_of(node, op.name)
    assert "hello tessera" in out
    ids = next(ln for ln in out.splitlines() if ln.startswith("uid="))
    uid = int(ids.split()[0].removeprefix("uid="))
    # A uid of its own from the range, no account, its gid the same, no other group.
    assert uid in AGENT_UIDS and ids == f"uid={uid} gid={uid} groups={uid}", ids
    assert f"read {key_file}: denied" in out
    assert "control.txt: allowed" in out  # the path was reachable; the data dir said no
    assert "signal parent: denied" in out  # the wrapper that cleans up is out of its reach
    env_line = next(ln for ln in out.splitlines() if ln.startswith("env: "))
    names = set(env_line.removeprefix("env: ").split())
    assert names <= ALLOWED_ENV, names - ALLOWED_ENV
    assert "s3cr3t" not in out and node.env["TESSERA_STORE_DSN"] not in out
    # Nothing the node had open reaches the agent (uvloop ignores close_fds): what `ls`
    # started by it inherits is stdin, stdout, stderr, and 3 is the directory ls reads.
    fds = next(ln for ln in out.splitlines() if ln.startswith("fds: "))
    assert fds.removeprefix("fds: ").split() == ["0", "1", "2", "3"], fds
    assert final.output["exit_code"] == 0 and final.output["truncated_bytes"] == 0
    rows = sql(node, "SELECT method, identity, grant_name, kind, reason FROM audit_log"
                     " WHERE service = 'tessera.agents' ORDER BY sequence")
    caller = rows[0][1]
    assert caller.startswith("spiffe://") and "/client/" in caller
    assert rows == [("spawn", caller, "", "probe", "AGENT_SPAWNED"),
                    ("end", caller, "", "probe", "AGENT_EXITED")]

    # The same through the command line, as docs/commands.md shows it.
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(node, "agents", *args, timeout=DEADLINE_S)

    listed = cli("list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [a["name"] for a in json.loads(listed.stdout)["agents"]] == [
        "brief", "chatty", "escape", "probe"]
    watched = cli("spawn", "probe", "--arg", "name=cli", "--arg", "lines=1", "--watch")
    assert watched.returncode == 0, watched.stderr
    assert "hello cli\n" in watched.stdout and "line 0 of 1" in watched.stdout
    name = watched.stderr.strip().splitlines()[0]
    status = cli("status", name)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"] == "SUCCEEDED", status.stdout
    refused = cli("spawn", "probe", "--arg", "name=NOT-LOWER")
    assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr


async def test_output_beyond_the_limit_is_dropped_and_counted(
        agent_node: Callable[..., NodeProcess]) -> None:
    node = agent_node()
    async with node.client() as c:
        op = await c.command.Execute(spawn("chatty-1", "chatty", name="x", lines=50000))
    final = await done_op(node, op.name)
    assert final.state == command_pb2.OPERATION_STATE_SUCCEEDED, final
    out = output_of(node, op.name)
    kept, _, marker = out.partition("\n[tessera: output truncated, ")
    assert marker, out[-300:]
    assert len(kept.encode()) <= 2000
    assert marker.endswith(" bytes dropped]\n")
    assert final.output["output_bytes"] == 2000
    # ~66 bytes per line: everything beyond the limit was read and dropped, not kept.
    assert final.output["truncated_bytes"] > 50000 * 60


# -- kill, caps, crashes ----------------------------------------------------------------


async def test_cancel_kills_the_whole_group_and_the_grant_cap_refuses_a_second_run(
        agent_node: Callable[..., NodeProcess], agent_user: pwd.struct_passwd) -> None:
    node = agent_node(max_per_grant=1)
    async with node.client() as c:
        op = await c.command.Execute(spawn("sleep-1", "probe", name="a", seconds=300))
        pgid = await recorded_group(node, op.name)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.command.Execute(spawn("sleep-2", "probe", name="b", seconds=300))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_per_grant" in (err.value.details() or "")
        # A retry of the running one gets it back, not a refusal by its own cap.
        retried = await c.command.Execute(spawn("sleep-1", "probe", name="a", seconds=300))
        assert retried.name == op.name
        await c.command.CancelOperation(command_pb2.CancelOperationRequest(name=op.name))
    final = await done_op(node, op.name)
    assert final.state == command_pb2.OPERATION_STATE_CANCELLED, final
    await gone(pgid, "the agent's group to be gone")
    assert agent_processes() == []
    methods = [r[0] for r in sql(node, "SELECT method FROM audit_log WHERE service ="
                                       " 'tessera.agents' ORDER BY sequence")]
    assert methods == ["spawn", "kill", "end"]
    # The slot is free again.
    async with node.client() as c:
        again = await c.command.Execute(spawn("quick-1", "probe", name="c"))
    assert (await done_op(node, again.name)).state == command_pb2.OPERATION_STATE_SUCCEEDED


async def test_a_killed_node_leaves_no_agent_and_its_run_ends_after_restart(
        agent_node: Callable[..., NodeProcess], agent_user: pwd.struct_passwd) -> None:
    node = agent_node()
    async with node.client() as c:
        op = await c.command.Execute(spawn("sleep-k", "probe", name="a", seconds=300))
    pgid = await recorded_group(node, op.name)
    assert node.serving_pids  # the wrapper's parent is a serving process
    node.crash()  # SIGKILL of the serving processes and the supervisor
    # The parent-death signal reaches the wrapper, which kills its group.
    await gone(pgid, "the agent's group to die with the node")
    node.start()
    final = await done_op(node, op.name)
    assert final.state == command_pb2.OPERATION_STATE_FAILED, final
    assert final.error.code == grpc.StatusCode.ABORTED.value[0]
    assert agent_processes() == []
    assert not list((node.data_dir / "agents").glob("*.json"))


async def test_a_run_beyond_its_time_limit_is_killed_and_fails(
        agent_node: Callable[..., NodeProcess], agent_user: pwd.struct_passwd) -> None:
    node = agent_node()
    async with node.client() as c:
        op = await c.command.Execute(spawn("brief-1", "brief", name="x", seconds=300))
    final = await done_op(node, op.name)
    assert final.state == command_pb2.OPERATION_STATE_FAILED, final
    assert final.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert "time limit" in final.error.message
    assert "waiting 300 s" in output_of(node, op.name)
    assert agent_processes() == []


async def test_a_process_that_leaves_the_group_is_still_killed(
        agent_node: Callable[..., NodeProcess], agent_user: pwd.struct_passwd) -> None:
    node = agent_node()
    async with node.client() as c:
        op = await c.command.Execute(spawn("escape-1", "escape"))
    final = await done_op(node, op.name)
    assert final.state == command_pb2.OPERATION_STATE_SUCCEEDED, final
    # setsid -f put sleep in a new session; the wrapper (a subreaper) killed it anyway.
    assert agent_processes() == []


def test_a_restarted_node_kills_a_recorded_group_that_still_matches(tmp_path: Path) -> None:
    """The guarantee behind the parent-death signal: the pgid + start time record."""
    from tessera.commands._agents import start_ticks

    proc = subprocess.Popen([sys.executable, "-c",
                             "import subprocess, time; subprocess.Popen(['sleep', '300']);"
                             " time.sleep(300)"], start_new_session=True)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while len(group_members(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(group_members(proc.pid)) == 2
        runs = tmp_path / "agents"
        runs.mkdir()
        ticks = start_ticks(proc.pid)
        assert ticks is not None
        # A record whose start time does not match (a reused pid) is left alone...
        (runs / "old.json").write_text(json.dumps({"pgid": proc.pid, "start_ticks": ticks + 1}))
        assert kill_leftovers(runs) == 0
        assert proc.poll() is None
        # ...so is one whose serving process still lives (a sibling's run)...
        (runs / "sibling.json").write_text(json.dumps({
            "pgid": proc.pid, "start_ticks": ticks, "owner_pid": proc.pid,
            "owner_start_ticks": ticks}))
        assert kill_leftovers(runs) == 0
        assert proc.poll() is None and (runs / "sibling.json").exists()
        (runs / "sibling.json").unlink()
        # ...the matching one of a gone process is killed, children included.
        (runs / "op.json").write_text(json.dumps({"pgid": proc.pid, "start_ticks": ticks}))
        assert kill_leftovers(runs) == 2
        assert proc.wait(DEADLINE_S) == -signal.SIGKILL
        while group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert group_members(proc.pid) == []
        assert list(runs.iterdir()) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def test_a_peer_spawns_only_with_a_grant_that_lists_it_and_is_capped_per_grant(
        agent_node: Callable[..., NodeProcess], agent_user: pwd.struct_passwd,
        peering: Any) -> None:
    node = agent_node(max_per_grant=1)
    alpha = await peering.link(node, "alpha", kinds=["task"], workspaces=["*"],
                               command_types=["agent.spawn"])
    beta = await peering.link(node, "beta", kinds=["task"], workspaces=["*"],
                              command_types=["resource.put"])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await beta.command.Execute(spawn("b-1", "probe", name="b"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    op = await alpha.command.Execute(spawn("a-1", "probe", name="a", seconds=300))
    pgid = await recorded_group(node, op.name)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await alpha.command.Execute(spawn("a-2", "probe", name="a", seconds=300))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The cap is the grant's: a local caller (another "grant") still gets its run.
    async with node.client() as c:
        local = await c.command.Execute(spawn("l-1", "probe", name="l"))
    assert (await done_op(node, local.name)).state == command_pb2.OPERATION_STATE_SUCCEEDED
    # The peer kills its own run; the whole group goes.
    await alpha.command.CancelOperation(command_pb2.CancelOperationRequest(name=op.name))
    await gone(pgid, "the peer's agent group to be gone")

    async def cancelled() -> command_pb2.Operation | None:
        got = await alpha.command.GetOperation(command_pb2.GetOperationRequest(name=op.name))
        return got if got.state == command_pb2.OPERATION_STATE_CANCELLED else None

    await until(cancelled, "the peer's run to end CANCELLED")
    grant_names = sql(node, "SELECT DISTINCT grant_name FROM audit_log WHERE peer = 'alpha'"
                            " AND method = 'Execute'")
    assert len(grant_names) == 1 and grant_names[0][0]
    rows = sql(node, "SELECT method, grant_name FROM audit_log WHERE service ="
                     " 'tessera.agents' AND kind = 'probe' AND grant_name <> ''"
                     " ORDER BY sequence")
    assert rows == [("spawn", grant_names[0][0]), ("kill", grant_names[0][0]),
                    ("end", grant_names[0][0])]
    assert agent_processes() == []


# -- review: caller values and agent output that the store or exec cannot take ----------

_REVIEW_AGENTS = (
    # An unbounded string param: its schema sets no maxLength.
    '\n[agents.echo]\nexecutable = "/bin/echo"\nparams = ["text"]\n'
    'schema = { type = "object", properties = { text = { type = "string" } } }\n'
    'cwd = "/"\n'
    # An agent whose output holds a NUL byte between two words.
    '\n[agents.nul]\nexecutable = "/bin/sh"\n'
    'args = ["-c", "printf \'before\\\\000after\\\\n\'"]\ncwd = "/"\n')


async def test_a_value_too_long_for_the_command_line_is_refused_as_invalid_argument(
        agent_node: Callable[..., NodeProcess], agent_user: pwd.struct_passwd) -> None:
    node = agent_node(extra=_REVIEW_AGENTS)
    async with node.client() as c:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.command.Execute(spawn("long-1", "echo", text="a" * 200_000))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "plugin.args.args.text" in bad_fields(err.value)
        # A long value that fits still runs.
        op = await c.command.Execute(spawn("long-2", "echo", text="b" * 20_000))
    final = await done_op(node, op.name)
    assert final.state == command_pb2.OPERATION_STATE_SUCCEEDED, final
    assert "b" * 20_000 in output_of(node, op.name)
    assert agent_processes() == []


async def test_a_nul_byte_in_agent_output_loses_no_output(
        agent_node: Callable[..., NodeProcess]) -> None:
    node = agent_node(extra=_REVIEW_AGENTS)
    async with node.client() as c:
        op = await c.command.Execute(spawn("nul-1", "nul"))
    final = await done_op(node, op.name)
    assert final.state == command_pb2.OPERATION_STATE_SUCCEEDED, final
    out = output_of(node, op.name)
    assert "before" in out and "after" in out, repr(out)


async def test_revoking_a_peers_grant_kills_its_running_agent(
        agent_node: Callable[..., NodeProcess], agent_user: pwd.struct_passwd,
        peering: Any) -> None:
    node = agent_node()
    alpha = await peering.link(node, "alpha", kinds=["task"], workspaces=["*"],
                               command_types=["agent.spawn"])
    op = await alpha.command.Execute(spawn("rv-1", "probe", name="a", seconds=300))
    pgid = await recorded_group(node, op.name)
    async with node.client("admin") as admin:
        grants = await admin.admin.ListGrants(admin_pb2.ListGrantsRequest(peer="alpha"))
        (grant,) = grants.grants
        await admin.admin.RevokeGrant(admin_pb2.RevokeGrantRequest(name=grant.name))
    # The revoked peer can no longer cancel it; the node ends it on its own.
    await gone(pgid, "the revoked peer's agent group to be killed")
    uuid = op.name.removeprefix("operations/")

    async def ended() -> tuple[Any, ...] | None:
        rows = sql(node, "SELECT state, error_code, error_reason FROM operations"
                         " WHERE name = %s AND state <> 'RUNNING'", (uuid,))
        return rows[0] if rows else None

    final = await until(ended, "the revoked peer's run to end")
    assert final == ("FAILED", grpc.StatusCode.PERMISSION_DENIED.value[0],
                     "AGENT_GRANT_REVOKED"), final
    assert agent_processes() == []


async def test_the_grant_cap_holds_across_two_node_processes_sharing_a_store(
        agent_node: Callable[..., NodeProcess], agent_user: pwd.struct_passwd,
        pg_server: str) -> None:
    dsn = new_database(pg_server)
    nodes = [agent_node(max_per_grant=1, dsn=dsn), agent_node(max_per_grant=1, dsn=dsn)]

    async def try_spawn(node: NodeProcess, key: str) -> str:
        async with node.client() as c:
            try:
                op = await c.command.Execute(spawn(key, "probe", name="x", seconds=300))
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                return ""
            return op.name

    # Both processes admit at once: local callers share the "(local)" grant cap of 1.
    names = await asyncio.gather(*(try_spawn(n, f"cap-{i}-{j}") for j in range(4)
                                   for i, n in enumerate(nodes)))
    accepted = [n for n in names if n]
    uuids = [n.removeprefix("operations/") for n in accepted]

    async def settled() -> list[tuple[Any, ...]] | None:
        rows = sql(node_a, "SELECT name::text, state FROM operations WHERE name::text = ANY(%s)",
                   (uuids,))
        records = sum(len(list((n.data_dir / "agents").glob("*.json"))) for n in nodes)
        running = [r for r in rows if r[1] == "RUNNING"]
        pending = [r for r in rows if r[1] == "PENDING"]
        return rows if not pending and records == len(running) else None

    node_a = nodes[0]
    rows = await until(settled, "every accepted run to start or be refused")
    running = [r for r in rows if r[1] == "RUNNING"]
    try:
        assert len(running) <= 1, rows
    finally:
        for node in nodes:
            async with node.client() as c:
                for name in accepted:
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await c.command.CancelOperation(
                            command_pb2.CancelOperationRequest(name=name))
        await until(lambda: _async(not agent_processes() or None),
                    "every agent to be gone")


async def test_nan_and_infinity_are_refused_for_a_number_param(
        agent_node: Callable[..., NodeProcess], agent_user: pwd.struct_passwd) -> None:
    node = agent_node(extra='\n[agents.num]\nexecutable = "/bin/echo"\nparams = ["x"]\n'
                            'schema = { type = "object", properties = { x = { type = "number",'
                            ' minimum = 0, maximum = 10 } } }\ncwd = "/"\n')
    async with node.client() as c:
        for i, bad in enumerate((float("nan"), float("inf"), float("-inf"))):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.command.Execute(spawn(f"num-{i}", "num", x=bad))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert any(f.startswith("plugin.args") for f in bad_fields(err.value))
        # A resource attribute likewise.
        attrs = struct_pb2.Struct()
        attrs.update({"n": float("nan")})
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.command.Execute(command_pb2.ExecuteRequest(
                idempotency_key="num-put", put_resource=command_pb2.PutResourceCommand(
                    resource=resources_pb2.Resource(workspace="acme", kind="task", id="n1",
                                                    title="t", attributes=attrs))))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert any(f.startswith("put_resource.resource.attributes")
                   for f in bad_fields(err.value))
        op = await c.command.Execute(spawn("num-ok", "num", x=2.5))
    final = await done_op(node, op.name)
    assert final.state == command_pb2.OPERATION_STATE_SUCCEEDED, final
    assert "-- 2.5" in output_of(node, op.name)
    assert agent_processes() == []


async def test_a_trailing_newline_does_not_pass_an_anchored_pattern(
        agent_node: Callable[..., NodeProcess], agent_user: pwd.struct_passwd) -> None:
    node = agent_node()
    async with node.client() as c:
        for i, bad in enumerate(("tessera\n", "tessera\n\n", "a\nb")):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.command.Execute(spawn(f"nl-{i}", "probe", name=bad))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, repr(bad)
            assert "plugin.args.args.name" in bad_fields(err.value)
    assert sql(node, "SELECT count(*) FROM operations")[0][0] == 0
    assert agent_processes() == []


def test_a_schema_type_list_stops_the_start_with_one_line_naming_it(
        agent_node: Callable[..., NodeProcess]) -> None:
    node = agent_node(extra='\n[agents.typelist]\nexecutable = "/bin/echo"\nparams = ["x"]\n'
                            'schema = { type = "object", properties = { x = { type = '
                            '["string", "integer"] } } }\ncwd = "/"\n', start=False)
    done = subprocess.run(
        [sys.executable, "-m", "tessera.cli", "serve", "--data-dir", str(node.data_dir),
         "--listen", "127.0.0.1:0"], env=node.env, capture_output=True, text=True,
        timeout=DEADLINE_S, check=False)
    assert done.returncode != 0
    said = [ln for ln in (done.stdout + done.stderr).splitlines() if "agents.typelist" in ln]
    assert len(said) == 1 and "must have a scalar type" in said[0], said
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


async def test_a_graceful_stop_leaves_no_process_that_left_the_group(
        agent_node: Callable[..., NodeProcess], agent_user: pwd.struct_passwd) -> None:
    node = agent_node(extra='\n[agents.stay]\nexecutable = "/bin/sh"\n'
                            'args = ["-c", "setsid -f /bin/sleep 300; echo left; sleep 300"]\n'
                            'cwd = "/"\n')
    async with node.client() as c:
        op = await c.command.Execute(spawn("stay-1", "stay"))
    pgid = await recorded_group(node, op.name)
    await until(lambda: _async("left" in output_of(node, op.name) or None),
                "the agent to start a process in its own session")
    outside = [p for p in agent_processes() if os.getpgid(p) != pgid]
    assert outside, "no agent process outside the group"
    node.stop()  # SIGTERM: the node ends its runs on the way out
    await until(lambda: _async(not agent_processes() or None),
                "every agent process, also the one in its own session, to be gone")


# -- one uid per run: runs of different callers cannot touch each other -------------------

_SIGNAL_AGENT = (
    '\n[agents.signal]\nexecutable = "/bin/sh"\nparams = ["pid"]\n'
    'schema = { type = "object", properties = { pid = { type = "integer", minimum = 2 } } }\n'
    # sh -c SCRIPT -- PID: $0 is "--", $1 the pid another caller's agent runs as.
    'args = ["-c", "echo uid=$(id -u); if kill -TERM \\"$1\\"; then echo signal: sent;'
    ' else echo signal: refused; fi; if cat /proc/$1/environ >/dev/null; then'
    ' echo environ: read; else echo environ: denied; fi"]\n'
    'cwd = "/"\n')


def agent_of_group(pgid: int) -> int:
    """The agent process of a run: the wrapper's (the group leader's) child."""
    (pid,) = children_of(pgid)
    return pid


async def test_one_callers_agent_cannot_signal_or_read_another_callers_agent(
        agent_node: Callable[..., NodeProcess], peering: Any) -> None:
    node = agent_node(extra=_SIGNAL_AGENT)
    alpha = await peering.link(node, "alpha", kinds=["task"], workspaces=["*"],
                               command_types=["agent.spawn"])
    victim_op = await alpha.command.Execute(spawn("victim-1", "probe", name="b", seconds=300))
    pgid = await recorded_group(node, victim_op.name)
    victim = agent_of_group(pgid)
    (victim_uid,) = uids_of(victim)
    async with node.client() as c:
        op = await c.command.Execute(spawn("attack-1", "signal", pid=victim))
    final = await done_op(node, op.name)
    assert final.state == command_pb2.OPERATION_STATE_SUCCEEDED, final
    out = output_of(node, op.name)
    attacker_uid = int(out.split("uid=", 1)[1].split()[0])
    assert "Operation not permitted" in out and "signal: refused" in out, out
    assert "environ: denied" in out, out
    # Both ran as distinct uids of the range, neither root nor the node's.
    assert victim_uid in AGENT_UIDS and attacker_uid in AGENT_UIDS
    assert victim_uid != attacker_uid
    # The victim lives on, as itself; its caller ends it.
    assert uids_of(victim) == {victim_uid}
    await alpha.command.CancelOperation(command_pb2.CancelOperationRequest(name=victim_op.name))
    await gone(pgid, "the victim's group to be gone after its caller cancelled it")
    assert agent_processes() == []


# -- agent.status and agent.kill: command types on the caller's own runs -------------------


def target(key: str, command_type: str, operation: str) -> command_pb2.ExecuteRequest:
    s = struct_pb2.Struct()
    s.update({"operation": operation})
    return command_pb2.ExecuteRequest(
        idempotency_key=key, plugin=command_pb2.PluginCommand(type=command_type, args=s))


async def test_status_and_kill_commands_reach_only_the_callers_own_run(
        agent_node: Callable[..., NodeProcess], peering: Any) -> None:
    node = agent_node()
    alpha = await peering.link(node, "alpha", kinds=["task"], workspaces=["*"],
                               command_types=["agent.spawn"])
    beta = await peering.link(node, "beta", kinds=["task"], workspaces=["*"],
                              command_types=["resource.put"])
    async with node.client() as c:
        run = await c.command.Execute(spawn("own-1", "probe", name="a", seconds=300))
        pgid = await recorded_group(node, run.name)
        status = await c.command.Execute(target("st-1", "agent.status", run.name))
        said = (await done_op(node, status.name)).output
        assert said["state"] == "RUNNING" and said["agent"] == "probe", said
        assert said["pid"] == pgid and said["pgid"] == pgid and said["uid"] in AGENT_UIDS
    # Another caller (a peer whose grant allows agent.spawn, so status and kill too) is
    # told the run does not exist; a peer without agent.spawn may not ask at all.
    for verb in ("agent.status", "agent.kill"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await alpha.command.Execute(target(f"x-{verb}", verb, run.name))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await beta.command.Execute(target(f"y-{verb}", verb, run.name))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
    assert len(group_members(pgid)) >= 2  # still running
    denied = sql(node, "SELECT method, outcome, status_code, reason FROM audit_log WHERE"
                       " service = 'tessera.agents' AND outcome <> 'ALLOWED' ORDER BY sequence")
    assert denied == [("status", "DENIED_BY_POLICY", "NOT_FOUND", "AGENT_RUN_NOT_FOUND"),
                      ("kill", "DENIED_BY_POLICY", "NOT_FOUND", "AGENT_RUN_NOT_FOUND")]
    # The peer's own run: status and kill come with its agent.spawn grant.
    own = await alpha.command.Execute(spawn("p-1", "probe", name="p", seconds=300))
    peer_pgid = await recorded_group(node, own.name)
    peer_kill = await alpha.command.Execute(target("p-kill", "agent.kill", own.name))
    await gone(peer_pgid, "the peer's run to be killed by its agent.kill")

    async def peer_done() -> command_pb2.Operation | None:
        got = await alpha.command.GetOperation(
            command_pb2.GetOperationRequest(name=peer_kill.name))
        return got if got.done else None

    assert (await until(peer_done, "the peer's agent.kill")).output["state"] == "CANCELLED"
    # The caller kills its own run: the whole group goes, the run ends CANCELLED.
    async with node.client() as c:
        kill = await c.command.Execute(target("kill-1", "agent.kill", run.name))
    killed = await done_op(node, kill.name)
    assert killed.state == command_pb2.OPERATION_STATE_SUCCEEDED, killed
    assert killed.output["state"] == "CANCELLED", killed.output
    await gone(pgid, "the killed run's group to be gone")
    assert (await done_op(node, run.name)).state == command_pb2.OPERATION_STATE_CANCELLED
    async with node.client() as c:
        after = await c.command.Execute(target("st-2", "agent.status", run.name))
    said = (await done_op(node, after.name)).output
    assert said["state"] == "CANCELLED" and "pid" not in said, said
    kills = sql(node, "SELECT identity FROM audit_log WHERE service = 'tessera.agents'"
                      " AND method = 'kill' AND outcome = 'ALLOWED'")
    assert len(kills) == 2
    assert agent_processes() == []
