"""Commands to peers (ExecuteRequest.target) across real nodes joined over mTLS.

A local tool on node A executes a command on peer B through A: A forwards it under the
grant B gave A, with a remote idempotency key derived from the tool's identity and key,
and relays B's operation (Get, Watch, Cancel) to that tool only. B checks the command
type against A's grant and audits; A audits the forwarding. Agent runs on B need root
(the node switches the agent to its own user), as in tests/integration/test_agents.py,
whose fixtures start B.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import pwd
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import struct_pb2

from tessera_client.pb import admin_pb2, command_pb2, query_pb2
from tests.fixtures.calls import bad_fields, key, put, reason_of, run_cli
from tests.fixtures.nodes import NodeFactory, NodeProcess
from tests.fixtures.peers import Peering
from tests.fixtures.waiting import wait_until
from tests.integration.test_agents import (  # noqa: F401 - fixtures used by name
    AGENT_UIDS,
    agent_node,
    agent_user,
    gone,
    recorded_group,
)

#: Agent runs are host-wide (uids, processes): one such test at a time across pytest-xdist
#: workers (tests/conftest.py), so "no agent process is left" sees only this test's.
pytestmark = pytest.mark.agents

DEADLINE_S = 60.0
FAST = {"TESSERA_FEDERATION_PEER_TIMEOUT_MS": "1500",
        "TESSERA_FEDERATION_BREAKER_FAILURES": "2",
        "TESSERA_FEDERATION_BREAKER_COOLDOWN_S": "1"}


def remote_key(caller: str, key: str) -> str:
    """The remote key as docs/security.md defines it (computed here independently)."""
    return hashlib.sha256(b"tessera/forwarded-command/v1\x00" + caller.encode() + b"\x00"
                          + key.encode()).hexdigest()


def sql(node: NodeProcess, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(node.env["TESSERA_STORE_DSN"], autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


async def audit_rows(node: NodeProcess, where: str, params: tuple[Any, ...],
                     what: str) -> list[tuple[Any, ...]]:
    """Audit rows matching `where`, once at least one is linked into the chain."""
    async def probe() -> list[tuple[Any, ...]] | None:
        query = ("SELECT identity, peer, grant_name, service, method, status_code, reason,"  # noqa: S608
                 f" detail FROM audit_log WHERE {where} ORDER BY sequence")
        return sql(node, query, params) or None
    return await wait_until(probe, what)


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


async def _joined(node_factory: NodeFactory, peering: Peering, b: NodeProcess,
                  **grant: Any) -> tuple[NodeProcess, str]:
    """Node a, joined to b under a grant with `grant`; the grant's name."""
    a = node_factory(name="a", env=FAST)
    token = await peering.invite(b, "a")
    g = await peering.grant(b, "a", kinds=["task"], workspaces=["shared"], **grant)
    res = peering.join_cli(token, a)
    assert res.returncode == 0, res.stderr
    return a, g.name


# -- resource commands: no agents, no root -------------------------------------------


async def test_a_local_tool_executes_on_a_peer_through_its_node_and_only_it_sees_it(
        node_factory: NodeFactory, peering: Peering) -> None:
    b = node_factory(name="b")
    a, grant = await _joined(node_factory, peering, b, command_types=["resource.put"])
    put_req = put("shared", "task", "t1", key="k1", title="from a's tool")
    put_req.target = "b"
    async with a.client() as tool, a.client("admin") as other, b.client() as on_b:
        op = await tool.command.Execute(put_req)
        assert op.done and op.state == command_pb2.OPERATION_STATE_SUCCEEDED, op
        assert op.target == "b" and op.idempotency_key == "k1"
        assert op.result.resource.title == "from a's tool"
        me = op.caller
        assert "/client/" in me
        # It ran on b, not on a.
        got = await on_b.query.GetResource(query_pb2.GetResourceRequest(
            key=key("shared", "task", "t1")))
        assert got.resource.title == "from a's tool"
        err = await rpc_error(tool.query.GetResource(query_pb2.GetResourceRequest(
            key=key("shared", "task", "t1"))))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        # On b it belongs to a's node identity, under the derived key; its name is b's.
        rows = sql(b, "SELECT 'operations/' || name, caller, idempotency_key FROM operations")
        assert len(rows) == 1 and rows[0][0] != op.name and "/node/" in rows[0][1]
        assert rows[0][2] == remote_key(me, "k1")

        # A retry answers the same operation; the same key for another request does not.
        again = await tool.command.Execute(put_req)
        assert again.name == op.name and again.state == op.state
        other_put = put("shared", "task", "t9", key="k1")
        other_put.target = "b"
        err = await rpc_error(tool.command.Execute(other_put))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason_of(err) == "IDEMPOTENCY_KEY_REUSED"

        # Another local identity with the same key gets its own remote operation.
        theirs = await other.command.Execute(put_req)
        assert theirs.name != op.name and theirs.caller != me and "/admin/" in theirs.caller
        rows = sql(b, "SELECT 'operations/' || name, caller, idempotency_key FROM operations"
                      " ORDER BY created_at")
        assert len(rows) == 2 and rows[0][0] != rows[1][0] and rows[0][1] == rows[1][1]
        assert [r[2] for r in rows] == [remote_key(me, "k1"), remote_key(theirs.caller, "k1")]

        # Get, Watch and Cancel of the tool's forwarded operation by another local caller:
        # NOT_FOUND, as for any other caller's operation.
        for call in (other.command.GetOperation(command_pb2.GetOperationRequest(name=op.name)),
                     other.command.CancelOperation(
                         command_pb2.CancelOperationRequest(name=op.name))):
            err = await rpc_error(call)
            assert err.code() == grpc.StatusCode.NOT_FOUND, err
        with pytest.raises(grpc.aio.AioRpcError) as werr:
            async for _ in other.command.WatchOperation(
                    command_pb2.WatchOperationRequest(name=op.name)):
                pass
        assert werr.value.code() == grpc.StatusCode.NOT_FOUND
        # ... and b's own operation name means nothing on a.
        err = await rpc_error(tool.command.GetOperation(
            command_pb2.GetOperationRequest(name=rows[0][0])))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        # Listing shows local operations only (a forwarded one's state is b's).
        listed = await tool.command.ListOperations(command_pb2.ListOperationsRequest())
        assert op.name not in [o.name for o in listed.operations]
        # The owner reads and watches it through a; cancelling a done one is relayed.
        mine = await tool.command.GetOperation(command_pb2.GetOperationRequest(name=op.name))
        assert mine.name == op.name and mine.done and mine.target == "b"
        watched = [m async for m in tool.command.WatchOperation(
            command_pb2.WatchOperationRequest(name=op.name))]
        assert watched[-1].done and watched[-1].name == op.name
        err = await rpc_error(tool.command.CancelOperation(
            command_pb2.CancelOperationRequest(name=op.name)))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason_of(err) == "OPERATION_DONE" and "peer b" in (err.details() or "")

        # A type b's grant does not name: b refuses (relayed as b said it) and audits it
        # with the peer and the grant; a keeps nothing for the key.
        delete = command_pb2.ExecuteRequest(
            idempotency_key="k-del", target="b",
            delete_resource=command_pb2.DeleteResourceCommand(key=key("shared", "task", "t1")))
        err = await rpc_error(tool.command.Execute(delete))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert reason_of(err) == "COMMAND_NOT_GRANTED"
        denied = await audit_rows(b, "status_code = 'PERMISSION_DENIED' AND method = 'Execute'",
                                  (), "b's audit of the refused command")
        assert [(r[1], r[2], r[6]) for r in denied] == [("a", grant, "COMMAND_NOT_GRANTED")]
        assert sql(a, "SELECT count(*) FROM operations WHERE idempotency_key = 'k-del'") \
            == [(0,)]

        # Unknown target: refused naming the field, nothing stored or sent.
        nowhere = put("shared", "task", "t2", key="k-nowhere")
        nowhere.target = "nobody"
        err = await rpc_error(tool.command.Execute(nowhere))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert bad_fields(err) == ["target"] and reason_of(err) == "PEER_NOT_JOINED"
        assert sql(a, "SELECT count(*) FROM operations WHERE idempotency_key = 'k-nowhere'") \
            == [(0,)]

    # a audits the forwarding: the local caller, the target and b's operation.
    forwarded = await audit_rows(a, "service = 'tessera.forward' AND reason = 'FORWARDED'", (),
                                 "a's forward records")
    b_ops = {r[0]: r[1] for r in sql(b, "SELECT 'operations/' || name, idempotency_key"
                                        " FROM operations")}
    assert {(r[0], r[4], r[7]["target"], r[7]["remote_operation"]) for r in forwarded} == {
        (me, "Execute", "b", n) for n, k in b_ops.items() if k == remote_key(me, "k1")} | {
        (theirs.caller, "Execute", "b", n) for n, k in b_ops.items()
        if k == remote_key(theirs.caller, "k1")}
    assert all(r[7]["operation"] in (op.name, theirs.name) for r in forwarded)
    # ... besides each call's own record (committed with the forwarding record).
    calls = await audit_rows(a, "service = 'tessera.v1.CommandService' AND method = 'Execute'"
                                " AND status_code = 'OK' AND identity = %s", (me,),
                             "a's records of the tool's Execute calls")
    assert len(calls) == 2 and all(r[1] == "" and r[2] == "" for r in calls)  # k1 twice

    # b down: UNAVAILABLE naming the peer, never UNKNOWN.
    b.stop()
    async with a.client() as tool:
        err = await rpc_error(tool.command.GetOperation(
            command_pb2.GetOperationRequest(name=op.name)))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "peer b" in (err.details() or "")
        late = put("shared", "task", "t3", key="k-late")
        late.target = "b"
        err = await rpc_error(tool.command.Execute(late))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "peer b" in (err.details() or "")


async def test_forwarded_operations_are_pruned_done_or_never_confirmed(
        node_factory: NodeFactory, peering: Peering) -> None:
    b = node_factory(name="b")
    # A retention of about a second on a: pruning runs every half of it.
    a = node_factory(name="a", env={**FAST, "TESSERA_OPERATIONS_RETENTION_H": "0.0003"})
    token = await peering.invite(b, "a")
    await peering.grant(b, "a", kinds=["task"], workspaces=["shared"],
                        command_types=["resource.put"])
    assert peering.join_cli(token, a).returncode == 0
    put_req = put("shared", "task", "t1", key="k-old")
    put_req.target = "b"

    def rows(key: str) -> list[tuple[Any, ...]]:
        return sql(a, "SELECT state, forward_operation FROM operations"
                      " WHERE idempotency_key = %s", (key,))

    async with a.client() as tool:
        op = await tool.command.Execute(put_req)
        assert op.done and rows("k-old")[0][0] == "FORWARDED"

        async def pruned() -> bool:
            try:
                await tool.command.GetOperation(command_pb2.GetOperationRequest(name=op.name))
            except grpc.aio.AioRpcError as exc:
                return exc.code() == grpc.StatusCode.NOT_FOUND
            return False

        await wait_until(pruned, "the done forwarded operation to be pruned on a")
        assert rows("k-old") == []
        b.stop()
        late = put("shared", "task", "t2", key="k-late")
        late.target = "b"
        err = await rpc_error(tool.command.Execute(late))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        # Kept for a retry with the same key (b may have accepted it), then pruned.
        assert rows("k-late") == [("FORWARDED", None)]
        await wait_until(lambda: rows("k-late") == [],
                         "the unconfirmed forwarded operation to be pruned on a",
                         timeout_s=DEADLINE_S)


async def test_a_peer_that_sets_target_is_refused_and_audited_and_nothing_runs(
        node_factory: NodeFactory, peering: Peering) -> None:
    b = node_factory(name="b")
    c = node_factory(name="c")
    a, grant = await _joined(node_factory, peering, b,
                             command_types=["resource.put", "agent.spawn"])
    # b has joined c too: a must not reach c through b.
    token = await peering.invite(c, "b")
    await peering.grant(c, "b", kinds=["task"], workspaces=["shared"],
                        command_types=["resource.put"])
    assert peering.join_cli(token, b).returncode == 0
    as_a = peering.outbound(a, "b").client()
    peering.clients.append(as_a)
    put_req = put("shared", "task", "relayed", key="k-relay")
    put_req.target = "c"
    err = await rpc_error(as_a.command.Execute(put_req))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason_of(err) == "FORWARD_NOT_ALLOWED"
    # Refused before anything else: even an invalid request gets this answer.
    bad = command_pb2.ExecuteRequest(idempotency_key="", target="c")
    err = await rpc_error(as_a.command.Execute(bad))
    assert reason_of(err) == "FORWARD_NOT_ALLOWED"
    rows = await audit_rows(b, "reason = 'FORWARD_NOT_ALLOWED'", (), "b's audit of the refusal")
    assert [(r[1], r[2], r[5]) for r in rows] == [("a", grant, "PERMISSION_DENIED")] * 2
    for node in (b, c):
        assert sql(node, "SELECT count(*) FROM operations") == [(0,)]
    assert sql(b, "SELECT count(*) FROM audit_log WHERE service = 'tessera.forward'") == [(0,)]
    assert sql(c, "SELECT count(*) FROM audit_log WHERE peer = 'b'") == [(0,)]
    async with c.client() as on_c:
        err = await rpc_error(on_c.query.GetResource(query_pb2.GetResourceRequest(
            key=key("shared", "task", "relayed"))))
        assert err.code() == grpc.StatusCode.NOT_FOUND


# -- agent runs on the peer (root) ----------------------------------------------------


def spawn(key: str, agent: str, target: str, **args: Any) -> command_pb2.ExecuteRequest:
    s = struct_pb2.Struct()
    s.update({"agent": agent, "args": args})
    return command_pb2.ExecuteRequest(
        idempotency_key=key, target=target,
        plugin=command_pb2.PluginCommand(type="agent.spawn", args=s))


async def test_a_local_tool_spawns_watches_and_kills_an_agent_on_a_peer(
        agent_node: Callable[..., NodeProcess], agent_user: pwd.struct_passwd,  # noqa: F811
        node_factory: NodeFactory, peering: Peering) -> None:
    b = agent_node(max_per_grant=2)
    b_name = "tessera"  # the agent fixture's node name: a records b under it
    a, grant = await _joined(node_factory, peering, b, command_types=["agent.spawn"])
    async with a.client() as tool, a.client("admin") as other:
        # Spawned and watched to completion through a; the output is b's agent's.
        op = await tool.command.Execute(spawn("run-1", "probe", b_name, name="remote",
                                              lines=2))
        assert op.target == b_name and op.command_type == "agent.spawn"
        out, last = "", op
        async for msg in tool.command.WatchOperation(
                command_pb2.WatchOperationRequest(name=op.name)):
            assert msg.name == op.name
            out += msg.output_chunk
            last = msg
        assert last.done and last.state == command_pb2.OPERATION_STATE_SUCCEEDED, last
        assert last.output["exit_code"] == 0
        assert "hello remote\n" in out and "line 1 of 2" in out
        ids = next(ln for ln in out.splitlines() if ln.startswith("uid="))
        assert int(ids.split()[0].removeprefix("uid=")) in AGENT_UIDS, ids

        # A second run, cancelled through a: its process group on b is gone.
        long = await tool.command.Execute(spawn("run-2", "probe", b_name, name="sleepy",
                                                seconds=300))
        me = long.caller
        [(remote,)] = sql(b, "SELECT 'operations/' || name FROM operations"
                             " WHERE idempotency_key = %s", (remote_key(me, "run-2"),))
        pgid = await recorded_group(b, remote)
        # Another local caller can neither see nor kill it.
        err = await rpc_error(other.command.CancelOperation(
            command_pb2.CancelOperationRequest(name=long.name)))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        cancelled = await tool.command.CancelOperation(
            command_pb2.CancelOperationRequest(name=long.name))
        assert cancelled.name == long.name and cancelled.cancel_requested

        async def ended() -> command_pb2.Operation | None:
            got = await tool.command.GetOperation(
                command_pb2.GetOperationRequest(name=long.name))
            return got if got.done else None

        final = await wait_until(ended, "the cancelled run to end")
        assert final.state == command_pb2.OPERATION_STATE_CANCELLED, final
        await gone(pgid, "the cancelled agent's processes on b to be gone")

        # b audited the runs with the peer's grant; a audited the forwarding and the kill.
        spawned = await audit_rows(b, "service = 'tessera.agents' AND method = 'spawn'", (),
                                   "b's spawn records")
        assert {r[2] for r in spawned} == {grant} and len(spawned) == 2
        executed = await audit_rows(b, "service = 'tessera.v1.CommandService' AND"
                                       " method = 'Execute'", (), "b's Execute records")
        assert {(r[1], r[2], r[5]) for r in executed} == {("a", grant, "OK")}
        kills = await audit_rows(a, "service = 'tessera.forward' AND method ="
                                    " 'CancelOperation' AND reason = 'FORWARDED'", (),
                                 "a's forwarded cancel")
        assert [(r[0], r[7]["target"], r[7]["remote_operation"]) for r in kills] == [
            (me, b_name, remote)]
        # ... recorded before it was sent, too (b's answer might never have come).
        sent = sql(a, "SELECT identity, detail->>'remote_operation' FROM audit_log WHERE"
                      " service = 'tessera.forward' AND method = 'CancelOperation'"
                      " AND reason = 'FORWARDING'")
        assert sent == [(me, remote)]

        # agent.status / agent.kill name b's operation: b would check it against a, the
        # owner of every local caller's remote runs, so a does not forward them.
        for command_type in ("agent.status", "agent.kill"):
            s = struct_pb2.Struct()
            s.update({"operation": remote})
            err = await rpc_error(tool.command.Execute(command_pb2.ExecuteRequest(
                idempotency_key=f"fwd-{command_type}", target=b_name,
                plugin=command_pb2.PluginCommand(type=command_type, args=s))))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
            assert bad_fields(err) == ["plugin.type"]
        assert sql(b, "SELECT count(*) FROM operations WHERE command_type <> 'agent.spawn'") \
            == [(0,)]
        # a's own agent.status / agent.kill do not mistake it for a run on a.
        for command_type in ("agent.status", "agent.kill"):
            s = struct_pb2.Struct()
            s.update({"operation": long.name})
            err = await rpc_error(tool.command.Execute(command_pb2.ExecuteRequest(
                idempotency_key=f"local-{command_type}",
                plugin=command_pb2.PluginCommand(type=command_type, args=s))))
            assert err.code() in (grpc.StatusCode.NOT_FOUND,
                                  grpc.StatusCode.INVALID_ARGUMENT), err

        # The same through the command line of a: spawn, status and kill of a run on b.
        async def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return await asyncio.to_thread(run_cli, a, "agents", *args, timeout=DEADLINE_S)

        watched = await cli("spawn", "probe", "--target", b_name, "--arg", "name=cli",
                            "--arg", "lines=1", "--watch")
        assert watched.returncode == 0, watched.stderr
        assert "hello cli\n" in watched.stdout and "line 0 of 1" in watched.stdout
        started = await cli("spawn", "probe", "--target", b_name, "--arg", "name=later",
                            "--arg", "seconds=300", "--name-only")
        assert started.returncode == 0, started.stderr
        name = started.stdout.strip()
        [(remote3,)] = sql(b, "SELECT 'operations/' || name FROM operations"
                              " ORDER BY created_at DESC LIMIT 1")
        pgid3 = await recorded_group(b, remote3)
        status = await cli("status", name)
        assert status.returncode == 0, status.stderr
        shown = json.loads(status.stdout)
        assert shown["target"] == b_name and shown["state"] == "RUNNING"
        killed = await cli("kill", name)
        assert killed.returncode == 0, killed.stderr
        assert json.loads(killed.stdout)["state"] == "CANCELLED"
        await gone(pgid3, "the agent killed through a's command line to be gone on b")

        # b's grant without agent.spawn: refused on b, audited there with peer and grant.
        async with b.client("admin") as admin:
            await admin.admin.RevokeGrant(admin_pb2.RevokeGrantRequest(name=grant))
        narrower = await peering.grant(b, "a", kinds=["task"], workspaces=["shared"],
                                       command_types=["resource.put"])
        before = sql(b, "SELECT count(*) FROM operations")
        err = await rpc_error(tool.command.Execute(spawn("run-3", "probe", b_name, name="no")))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
        assert reason_of(err) == "COMMAND_NOT_GRANTED"
        denied = await audit_rows(b, "grant_name = %s AND status_code = 'PERMISSION_DENIED'",
                                  (narrower.name,), "b's audit of the refused spawn")
        assert [(r[1], r[4], r[6]) for r in denied] == [("a", "Execute", "COMMAND_NOT_GRANTED")]
        assert sql(b, "SELECT count(*) FROM operations") == before
