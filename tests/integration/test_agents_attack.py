"""Attacks on agent runs by a hostile agent or caller (review of issue 16), real processes.

Each test is an attack that worked before its fix; the fixtures are those of
test_agents.py (the node runs as root, agents run as uids of the default range).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from tessera.commands import kill_leftovers
from tessera.embedded import running_postgres_dsn
from tessera_client.pb import command_pb2
from tests.fixtures.nodes import TEST_DIMENSION, NodeProcess
from tests.integration.test_agents import (  # noqa: F401 - fixtures used by name
    AGENT_UIDS,
    DEADLINE_S,
    _async,
    agent_node,
    agent_processes,
    agent_user,
    done_op,
    output_of,
    recorded_group,
    spawn,
    sql,
    until,
)

#: Agent runs are host-wide (uids, processes): one such test at a time across pytest-xdist
#: workers (tests/conftest.py), so "no agent process is left" sees only this test's.
pytestmark = pytest.mark.agents

# -- a setuid file planted by one run must not give another run its uid -----------------------

#: `plant` copies `id` to PATH and makes it setuid to its own uid; `use` runs PATH.
_SETUID_AGENTS = (
    '\n[agents.plant]\nexecutable = "/bin/sh"\nparams = ["path"]\n'
    'schema = { type = "object", properties = { path = { type = "string", pattern ='
    ' "^/tmp/tessera-suid-[0-9a-f]{16}$" } } }\n'
    'args = ["-c", "cp /usr/bin/id \\"$1\\" && chmod 4755 \\"$1\\" && echo planted uid=$(id -u)"]\n'
    'cwd = "/"\n'
    '\n[agents.use]\nexecutable = "/bin/sh"\nparams = ["path"]\n'
    'schema = { type = "object", properties = { path = { type = "string", pattern ='
    ' "^/tmp/tessera-suid-[0-9a-f]{16}$" } } }\n'
    'args = ["-c", "echo real=$(id -ru) effective=$(\\"$1\\" -u)"]\n'
    'cwd = "/"\n')


async def test_a_setuid_file_left_by_one_run_does_not_give_another_run_its_uid(
        agent_node: Callable[..., NodeProcess]) -> None:  # noqa: F811
    """Attack: a run plants a setuid-to-itself copy of a program where anyone may write
    (/tmp). A later run of another caller, executing it, took that uid: with the uid
    drawn again (or planted across the range by many short runs), it could signal,
    trace and read that run. Agents now run with no_new_privs: setuid bits do nothing."""
    node = agent_node(extra=_SETUID_AGENTS)
    path = f"/tmp/tessera-suid-{secrets.token_hex(8)}"
    try:
        async with node.client() as c:
            op = await c.command.Execute(spawn("plant-1", "plant", path=path))
            final = await done_op(node, op.name)
            assert final.state == command_pb2.OPERATION_STATE_SUCCEEDED, \
                (final, output_of(node, op.name))
            planter = int(output_of(node, op.name).split("planted uid=", 1)[1].split()[0])
            assert planter in AGENT_UIDS
            st = os.stat(path)
            assert st.st_uid == planter and st.st_mode & 0o4000  # the setuid file is there
            op = await c.command.Execute(spawn("use-1", "use", path=path))
            final = await done_op(node, op.name)
            out = output_of(node, op.name)
            assert final.state == command_pb2.OPERATION_STATE_SUCCEEDED, (final, out)
        real = int(out.split("real=", 1)[1].split()[0])
        effective = int(out.split("effective=", 1)[1].split()[0])
        assert real in AGENT_UIDS and real != planter, out
        assert effective == real, f"the second run took the planting run's uid: {out}"
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    assert agent_processes() == []


# -- every end of a run is audited, also when the node stops -----------------------------------

async def test_a_run_ended_by_a_graceful_stop_is_audited_as_ended(
        agent_node: Callable[..., NodeProcess]) -> None:  # noqa: F811
    """Attack on the audit trail: a run the node ended because it stopped (SIGTERM, a
    lost lease) left a spawn record and no end: the end record was written only after a
    handler that ran to its end, so an interrupted run vanished from the audit."""
    node = agent_node()
    async with node.client() as c:
        op = await c.command.Execute(spawn("stop-1", "probe", name="a", seconds=300))
    await recorded_group(node, op.name)
    node.stop()
    await until(lambda: _async(not agent_processes() or None), "the agent to be gone")
    rows = sql(node, "SELECT method, reason, detail->>'operation', detail->>'killed_by'"
                     " FROM audit_log WHERE service = 'tessera.agents' ORDER BY sequence")
    assert [r[0] for r in rows] == ["spawn", "end"], rows
    assert rows[1][1] == "AGENT_EXITED" and rows[1][2] == op.name, rows
    assert rows[1][3] == "interrupted", rows


# -- embedded PostgreSQL's socket directory is no agent's to write -------------------------------

#: Renames embedded PostgreSQL's socket away and listens in its place: a node (or CLI) that
#: connects with the node's DSN then talks to the agent (trust authentication, no password).
_HIJACK = r"""
import os, socket, sys
path = os.path.join(sys.argv[-1], ".s.PGSQL.5432")
try:
    os.rename(path, path + ".moved")
except OSError as exc:
    print("rename: denied", exc.strerror, flush=True)
    sys.exit(0)
server = socket.socket(socket.AF_UNIX)
server.bind(path)
os.chmod(path, 0o777)
server.listen(1)
print("listening", flush=True)
conn, _ = server.accept()
startup = conn.recv(4096)
print("got", startup[8:].split(b"\0")[:4], flush=True)
msg = b"SFATAL\0C28000\0Mhijacked by an agent\0\0"
conn.sendall(b"E" + (len(msg) + 4).to_bytes(4, "big") + msg)
conn.close()
"""


@pytest.fixture
def embedded_agent_node(agent_user: pwd.struct_passwd,  # noqa: F811
                        valkey_url: str) -> Iterator[NodeProcess]:
    """A root node of the embedded tier whose data directory is too deep for a socket
    path, so embedded PostgreSQL's socket lives in a directory under /tmp."""
    base = Path(tempfile.mkdtemp(prefix="tessera-agents-pg-", dir="/tmp"))
    base.chmod(0o711)
    data = base / ("deep-data-directory-" + "d" * 90)
    config = base / "tessera.toml"
    config.write_text(
        "[agents]\nkill_grace_s = 2\n\n[agents.hijack]\nexecutable = \"/usr/bin/python3\"\n"
        f"args = [\"-I\", \"-c\", {json.dumps(_HIJACK)}]\nparams = [\"dir\"]\n"
        "schema = { type = \"object\", properties = { dir = { type = \"string\", pattern = "
        "\"^/tmp/[a-z0-9./-]{1,200}$\" } } }\ncwd = \"/\"\ntime_limit_s = 60\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env.update({"TESSERA_NODE_NAME": "tessera", "TESSERA_CONFIG": str(config),
                "TESSERA_STORE_EMBEDDING_DIMENSION": str(TEST_DIMENSION),
                "TESSERA_VALKEY_URL": valkey_url})
    node = NodeProcess(data, env, base / "node.log")
    node.start()
    try:
        yield node
    finally:
        if node.proc is not None and node.proc.poll() is None:
            node.stop()
        shutil.rmtree(base, ignore_errors=True)


async def test_an_agent_cannot_take_the_place_of_embedded_postgresqls_socket(
        embedded_agent_node: NodeProcess) -> None:
    """Attack: with a deep data directory embedded PostgreSQL's socket sits in
    /tmp/tessera-pg-<uid>/<hash>, which was mode 0777 without the sticky bit. An agent
    renamed the socket away and listened in its place: every new connection of the node
    (trust authentication) reached the agent, which could read the queries and forge the
    answers (grants, peers). The directory now belongs to PostgreSQL's account, 0700."""
    node = embedded_agent_node
    dsn = running_postgres_dsn(node.data_dir / "postgres")
    assert dsn is not None
    socket_dir = Path(dsn.split("host=", 1)[1].split("&", 1)[0])
    assert socket_dir.parent.parent == Path("/tmp"), socket_dir  # not in the data dir
    async with node.client() as c:
        op = await c.command.Execute(spawn("hijack-1", "hijack", dir=str(socket_dir)))
        said = await asyncio.wait_for(first_word(c, op.name, ("listening", "rename: denied")),
                                      DEADLINE_S)
        try:
            if said == "listening":
                with pytest.raises(psycopg.OperationalError) as err:
                    psycopg.connect(dsn, connect_timeout=10).close()
                pytest.fail(f"the node's DSN reached the agent: {err.value}")
        finally:
            _put_back(socket_dir)
        final = await done_op_dsn(c, op.name)
    assert final.state == command_pb2.OPERATION_STATE_SUCCEEDED, final
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    st = os.stat(socket_dir)
    assert st.st_mode & 0o777 == 0o700 and st.st_uid != 0, oct(st.st_mode)


def _put_back(socket_dir: Path) -> None:
    """Undo what the agent did: PostgreSQL's own socket back in its place."""
    moved = socket_dir / ".s.PGSQL.5432.moved"
    if moved.exists():
        (socket_dir / ".s.PGSQL.5432").unlink(missing_ok=True)
        moved.rename(socket_dir / ".s.PGSQL.5432")


async def first_word(c: Any, name: str, words: tuple[str, ...]) -> str:
    """The first of `words` the run prints (read from WatchOperation, not the store: the
    agent may sit on the store's socket)."""
    seen = ""
    async for op in c.command.WatchOperation(command_pb2.WatchOperationRequest(name=name)):
        seen += op.output_chunk
        for word in words:
            if word in seen:
                return word
        if op.done:
            break
    pytest.fail(f"{name} ended without saying any of {words}: {seen!r}")


async def done_op_dsn(c: Any, name: str) -> command_pb2.Operation:
    async def probe() -> command_pb2.Operation | None:
        op = await c.command.GetOperation(command_pb2.GetOperationRequest(name=name))
        return op if op.done else None

    return await until(probe, f"{name} to finish")


# -- secrets outside the data directory: the config file with the DSN, key files ---------------

def _serve(node: NodeProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tessera.cli", "serve", "--data-dir", str(node.data_dir),
         "--listen", "127.0.0.1:0"], env=node.env, capture_output=True, text=True,
        timeout=DEADLINE_S, check=False)


def test_agents_do_not_start_while_the_config_file_with_the_dsn_is_readable_to_them(
        agent_node: Callable[..., NodeProcess]) -> None:  # noqa: F811
    """Attack: the node closes its data directory to agents, but the DSN written in its
    config file (created 0644, as an editor or `cat >` does) was readable by every agent:
    the probe agent read it. The node now refuses to start agents until the file (or a
    directory above it) is closed to them, naming the file and the fix."""
    dsn_line = '\n[store]\ndsn = "postgresql://tessera:hunter2@127.0.0.1:1/tessera"\n'
    node = agent_node(extra=dsn_line, start=False)
    config = Path(node.env["TESSERA_CONFIG"])
    assert os.stat(config).st_mode & 0o004  # world-readable, as the fixture wrote it
    done = _serve(node)
    assert done.returncode != 0, done.stderr[-2000:]
    said = [ln for ln in (done.stdout + done.stderr).splitlines() if str(config) in ln]
    assert len(said) == 1 and "store.dsn" in said[0] and "agents" in said[0], said
    assert "hunter2" not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not (node.data_dir / "node.json").exists()
    # Closed to others, the node starts; the agent cannot read the file.
    os.chmod(config, 0o600)
    node.env["TESSERA_CONFIG"] = str(config)
    node.start()
    node.stop()


def test_agents_do_not_start_while_a_key_file_is_readable_to_them(
        agent_node: Callable[..., NodeProcess]) -> None:  # noqa: F811
    """Attack: with fixed TLS files (tls.key_file outside the data directory) a key left
    0644 was readable by every agent. The node refuses to start agents then."""
    node = agent_node()
    node.stop()
    tls = node.data_dir.parent / "tls-files"
    tls.mkdir(mode=0o755)
    for name in ("node.crt", "node.key", "ca.crt"):
        shutil.copy(node.data_dir / "pki" / name, tls / name)
        os.chmod(tls / name, 0o644)
    node.env.update({"TESSERA_TLS_CERT_FILE": str(tls / "node.crt"),
                     "TESSERA_TLS_KEY_FILE": str(tls / "node.key"),
                     "TESSERA_TLS_CA_FILE": str(tls / "ca.crt")})
    done = _serve(node)
    assert done.returncode != 0, done.stderr[-2000:]
    said = [ln for ln in (done.stdout + done.stderr).splitlines() if "tls.key_file" in ln]
    assert len(said) == 1 and str(tls / "node.key") in said[0], said
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    # A directory above it that agents cannot enter closes it as well.
    os.chmod(tls, 0o700)
    node.start()
    node.stop()


async def test_a_run_of_a_killed_node_is_audited_as_ended_after_the_restart(
        agent_node: Callable[..., NodeProcess]) -> None:  # noqa: F811
    """Attack on the audit trail: SIGKILL the node while its agent runs (the kernel then
    ends the agent). The restarted node cleaned up the run's record but wrote no end
    record: the audit showed a spawn that never ended. The restart now audits it, with
    the run's caller, grant and agent."""
    node = agent_node()
    async with node.client() as c:
        op = await c.command.Execute(spawn("crash-1", "probe", name="a", seconds=300))
    await recorded_group(node, op.name)
    node.crash()
    await until(lambda: _async(not agent_processes() or None), "the agent to be gone")
    node.start()
    assert (await done_op(node, op.name)).state == command_pb2.OPERATION_STATE_FAILED
    rows = sql(node, "SELECT method, identity, grant_name, kind, reason,"
                     " detail->>'operation', detail->>'killed_by' FROM audit_log"
                     " WHERE service = 'tessera.agents' ORDER BY sequence")
    # The supervisor may start a serving process between the SIGKILLs; whichever process
    # audits the end, it is there (twice at most, if one died between audit and cleanup).
    assert [r[0] for r in rows][:2] == ["spawn", "end"] and len(rows) <= 3, rows
    spawned, *ended = rows
    for end in ended:
        assert end[0] == "end" and end[1:4] == spawned[1:4] and end[3] == "probe", rows
        assert end[4:] == ("AGENT_EXITED", op.name, "node died"), rows
    assert not list((node.data_dir / "agents").iterdir()) or \
        [p.name for p in (node.data_dir / "agents").iterdir()] == ["uids"]


def test_an_executable_agents_could_replace_stops_the_start_with_one_line_naming_it(
        agent_node: Callable[..., NodeProcess]) -> None:  # noqa: F811
    """Attack: an allow-listed executable in a directory every account may write (0777,
    no sticky bit) was accepted. One run renames it away and puts its own program there;
    every later run, whoever's, executes that program as its own uid (its values, output
    and result in the attacker's hands). Such an entry now stops the start."""
    node = agent_node(start=False)
    open_dir = node.data_dir.parent / "open-bin"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    exe = open_dir / "probe.sh"
    shutil.copy(Path(__file__).resolve().parents[2] / "examples" / "agents" / "probe.sh", exe)
    exe.chmod(0o755)
    config = Path(node.env["TESSERA_CONFIG"])
    config.write_text(config.read_text() + f'\n[agents.swap]\nexecutable = "{exe}"\n'
                                           'cwd = "/"\n')
    done = _serve(node)
    assert done.returncode != 0, done.stderr[-2000:]
    said = [ln for ln in (done.stdout + done.stderr).splitlines() if "agents.swap" in ln]
    assert len(said) == 1 and "writable" in said[0], said
    # The same file in a directory only root writes is accepted.
    open_dir.chmod(0o755)
    node.start()
    node.stop()


async def test_a_pattern_class_means_what_json_schema_says_ascii_digits_and_words(
        agent_node: Callable[..., NodeProcess]) -> None:  # noqa: F811
    """Schema bypass: JSON Schema patterns are ECMA-262, where \\d is [0-9] and \\w is
    [A-Za-z0-9_]. Python's re matched any Unicode digit or letter, so "١٢٣" passed
    ^\\d+$ and "ｓｈ" passed ^\\w+$ and reached the agent's command line."""
    node = agent_node(extra='\n[agents.digits]\nexecutable = "/bin/echo"\n'
                            'params = ["n", "w"]\nschema = { type = "object", properties = {'
                            ' n = { type = "string", pattern = "^\\\\d{1,5}$" },'
                            ' w = { type = "string", pattern = "^\\\\w{1,9}$" } } }\n'
                            'cwd = "/"\n')
    async with node.client() as c:
        for i, (n, w) in enumerate((("\u0661\u0662\u0663", "ok"), ("12", "\uff53\uff48"),
                                    ("\uff11", "ok"))):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.command.Execute(spawn(f"digits-{i}", "digits", n=n, w=w))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (n, w)
        op = await c.command.Execute(spawn("digits-ok", "digits", n="123", w="a_b9"))
    final = await done_op(node, op.name)
    assert final.state == command_pb2.OPERATION_STATE_SUCCEEDED, final
    assert "-- 123 a_b9" in output_of(node, op.name)
    assert sql(node, "SELECT count(*) FROM operations")[0][0] == 1


def test_a_run_whose_serving_process_is_a_zombie_is_a_leftover(tmp_path: Path) -> None:
    """Cleanup and audit gap: a SIGKILLed serving process whose supervisor died too stays
    a zombie until init reaps it. Its /proc entry (pid and start time) still matched, so
    a restarted node took its runs for a live sibling's: it neither killed a group that
    outlived it nor audited the run's end. A zombie is not alive."""
    from tessera.commands._agents import start_ticks

    group = subprocess.Popen(["sleep", "300"], start_new_session=True)
    owner = subprocess.Popen(["true"])  # exits at once; not waited for: a zombie
    try:
        deadline = time.monotonic() + DEADLINE_S
        while Path(f"/proc/{owner.pid}/stat").read_text().split(") ")[1][0] != "Z":
            assert time.monotonic() < deadline, "no zombie"
            time.sleep(0.01)
        runs = tmp_path / "agents"
        runs.mkdir()
        (runs / "run.json").write_text(json.dumps({
            "pgid": group.pid, "start_ticks": start_ticks(group.pid),
            "owner_pid": owner.pid, "owner_start_ticks": start_ticks(owner.pid)}))
        assert kill_leftovers(runs) == 1
        assert group.wait(DEADLINE_S) == -signal.SIGKILL
        assert list(runs.iterdir()) == []
    finally:
        owner.wait()
        if group.poll() is None:
            group.kill()
            group.wait()
