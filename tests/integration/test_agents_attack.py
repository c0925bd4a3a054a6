"""Attacks on agent runs by a hostile agent or caller (review of issue 16), real processes.

Each test is an attack that worked before its fix; the fixtures are those of
test_agents.py (the node runs as root, agents run as uids of the default range).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable

from tessera_client.pb import command_pb2
from tests.fixtures.nodes import NodeProcess
from tests.integration.test_agents import (  # noqa: F401 - fixtures used by name
    AGENT_UIDS,
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
