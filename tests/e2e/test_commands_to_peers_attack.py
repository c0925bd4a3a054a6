"""Attacks on commands to peers (ExecuteRequest.target), with real nodes.

A malicious peer is played by a gRPC server holding B's own certificate, started on B's
address after B (really joined by A) stopped: A reaches it exactly as it reached B, over
mTLS, under the grant B gave A. What it answers is chosen by the test.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tessera.api import MAX_FORWARDED_WATCHES
from tessera_client.pb import admin_pb2, command_pb2, command_pb2_grpc
from tests.e2e.test_commands_to_peers import (
    _joined,
    audit_rows,
    remote_key,
    rpc_error,
    sql,
)
from tests.fixtures.calls import bad_fields, put, reason_of
from tests.fixtures.nodes import NodeFactory, NodeProcess
from tests.fixtures.peers import Peering
from tests.fixtures.waiting import wait_until

#: Agent runs are host-wide (uids, processes): one such test at a time across pytest-xdist
#: workers (tests/conftest.py), so "no agent process is left" sees only this test's.
pytestmark = pytest.mark.agents

RUNNING = command_pb2.OPERATION_STATE_RUNNING
SUCCEEDED = command_pb2.OPERATION_STATE_SUCCEEDED


class EvilB(command_pb2_grpc.CommandServiceServicer):
    """A peer that keeps streaming after an operation is done, and never closes."""

    def __init__(self) -> None:
        self.watching = 0
        self.watches = 0
        self.accepted: list[str] = []
        self.endless: set[str] = set()
        self.server: grpc.aio.Server | None = None
        self.cancelled: list[str] = []

    async def Execute(self, request: command_pb2.ExecuteRequest,
                      context: grpc.aio.ServicerContext) -> command_pb2.Operation:
        if request.idempotency_key and request.put_resource.resource.id == "evil-error":
            # A refusal crafted to land in A's audit and logs.
            info = any_pb2.Any()
            info.Pack(error_details_pb2.ErrorInfo(reason="OK\nFORGED audit line",
                                                  domain="tessera.dev"))
            await context.abort_with_status(rpc_status.to_status(status_pb2.Status(
                code=code_pb2.PERMISSION_DENIED, message="\x1b[2J" + "x" * 2000,
                details=[info])))
        if request.plugin.type == "agent.spawn":
            # A refusal that would redraw the operator's terminal on A.
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "\x1b[2K\r\x1b[1Aall good: SUCCEEDED\x07")
        if request.put_resource.resource.id == "lost-answer":
            # Accepted (it runs here), but the answer never reaches A.
            self.accepted.append(request.idempotency_key)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        name = f"operations/{uuid.uuid4()}"
        if request.put_resource.resource.id == "endless":
            self.endless.add(name)
        return command_pb2.Operation(name=name, command_type="resource.put", state=RUNNING)

    async def CancelOperation(self, request: command_pb2.CancelOperationRequest,
                              context: grpc.aio.ServicerContext) -> command_pb2.Operation:
        # Cancelled here, but the answer never reaches A.
        self.cancelled.append(request.name)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")

    async def GetOperation(self, request: command_pb2.GetOperationRequest,
                           context: grpc.aio.ServicerContext) -> command_pb2.Operation:
        return command_pb2.Operation(name=request.name, state=RUNNING)

    async def WatchOperation(self, request: command_pb2.WatchOperationRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[command_pb2.Operation]:
        self.watching += 1
        self.watches += 1
        try:
            yield command_pb2.Operation(name=request.name, state=RUNNING)
            if request.name in self.endless:
                await asyncio.Event().wait()
            for i in range(5):
                yield command_pb2.Operation(name=request.name, state=SUCCEEDED, done=True,
                                            output_chunk=f"after done {i}\n")
            await asyncio.Event().wait()  # and never ends
        finally:
            self.watching -= 1


async def evil_in_place_of(b: NodeProcess, servicer: EvilB) -> grpc.aio.Server:
    """Stop b; serve `servicer` on b's address with b's certificate (A cannot tell)."""
    address = b.address
    b.stop()
    server = grpc.aio.server()
    command_pb2_grpc.add_CommandServiceServicer_to_server(servicer, server)
    creds = grpc.ssl_server_credentials(
        [((b.pki / "node.key").read_bytes(), (b.pki / "node.crt").read_bytes())],
        root_certificates=(b.pki / "ca.crt").read_bytes(), require_client_auth=True)
    server.add_secure_port(address, creds)
    await server.start()
    return server


@pytest.fixture
async def evil(node_factory: NodeFactory, peering: Peering
               ) -> AsyncIterator[tuple[NodeProcess, EvilB]]:
    b = node_factory(name="b")
    a, _grant = await _joined(node_factory, peering, b, command_types=["resource.put"])
    servicer = EvilB()
    server = await evil_in_place_of(b, servicer)
    servicer.server = server
    try:
        yield a, servicer
    finally:
        await server.stop(grace=None)
    # Whatever the peer answered, a never failed internally (UNKNOWN / INTERNAL).
    assert "unhandled error" not in a.log()


async def test_a_relayed_watch_ends_at_the_first_done_and_releases_the_peer_stream(
        evil: tuple[NodeProcess, EvilB]) -> None:
    """Attack: B keeps a WatchOperation open after its operation is done (more `done`
    messages, then silence). A relayed every one (a DB write each) and held the stream
    while the tool waited for an end that never came (`agents spawn --watch`, `agents
    kill` hang). A's Watch ends with the first done message, and its stream to B ends."""
    a, servicer = evil
    put_req = put("shared", "task", "t1", key="k-watch")
    put_req.target = "b"
    async with a.client() as tool:
        op = await tool.command.Execute(put_req)
        assert op.target == "b" and not op.done
        seen: list[command_pb2.Operation] = []
        async for msg in tool.command.WatchOperation(
                command_pb2.WatchOperationRequest(name=op.name)):
            seen.append(msg)
            if sum(m.done for m in seen) > 1:
                break  # the relay went on after done
        assert [m.done for m in seen] == [False, True], seen
        assert all(m.name == op.name for m in seen)
        await wait_until(lambda: servicer.watches == 1 and servicer.watching == 0,
                         "a to end its stream to b once the operation was done")


async def test_a_peer_cannot_write_into_the_audit_log_or_terminal_of_the_caller_node(
        evil: tuple[NodeProcess, EvilB]) -> None:
    """Held: B's refusal with a forged ErrorInfo reason (newline) and a long message with
    terminal escapes. A relays the code; its audit keeps a code-name reason only, and the
    message is bounded."""
    a, _servicer = evil
    put_req = put("shared", "task", "evil-error", key="k-evil")
    put_req.target = "b"
    async with a.client() as tool:
        err = await rpc_error(tool.command.Execute(put_req))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason_of(err) == "OK\nFORGED audit line"  # the peer's word, relayed as it is
    assert len(err.details() or "") < 1100
    rows = await audit_rows(a, "service = 'tessera.v1.CommandService' AND method = 'Execute'"
                               " AND status_code = 'PERMISSION_DENIED'", (),
                            "a's record of the refused forward")
    assert [r[6] for r in rows] == ["PERMISSION_DENIED"]
    assert "FORGED" not in a.log()
    assert sql(a, "SELECT count(*) FROM operations WHERE idempotency_key = 'k-evil'") \
        == [(0,)]


async def test_a_command_sent_to_a_peer_is_audited_on_the_sender_before_any_answer(
        evil: tuple[NodeProcess, EvilB]) -> None:
    """Attack (audit gap): B accepts a command but its answer is lost (or B refuses it).
    A's only `tessera.forward` record was written on B's success, so B's audit showed a
    command from A under a remote key that no record on A tied to a local caller, and a
    refusal on A named no target. A now records every attempt (caller, target, local
    operation, remote key) with the reservation, before the command leaves."""
    a, servicer = evil
    put_req = put("shared", "task", "lost-answer", key="k-lost")
    put_req.target = "b"
    async with a.client() as tool:
        err = await rpc_error(tool.command.Execute(put_req))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        refused = put("shared", "task", "evil-error", key="k-refused")
        refused.target = "b"
        err = await rpc_error(tool.command.Execute(refused))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    [(caller,)] = sql(a, "SELECT caller FROM operations WHERE idempotency_key = 'k-lost'")
    assert servicer.accepted == [remote_key(caller, "k-lost")]
    rows = await audit_rows(a, "service = 'tessera.forward'", (), "a's forwarding records")
    sent = {(r[0], r[4], r[7]["target"], r[7]["remote_idempotency_key"]) for r in rows}
    assert (caller, "Execute", "b", remote_key(caller, "k-lost")) in sent
    assert (caller, "Execute", "b", remote_key(caller, "k-refused")) in sent


async def test_a_peer_that_fails_fast_costs_no_reservation(
        node_factory: NodeFactory, peering: Peering) -> None:
    """Attack (rows piling up): with B down and its circuit open, A sends nothing, yet each
    Execute with a new key stored a FORWARDED reservation that no retry could ever use
    (kept for the whole retention, 7 days by default). A refuses before reserving now;
    the reservations of attempts that did go out stay (B may have accepted them)."""
    b = node_factory(name="b")
    a = node_factory(name="a", env={"TESSERA_FEDERATION_BREAKER_FAILURES": "2",
                                    "TESSERA_FEDERATION_BREAKER_COOLDOWN_S": "600"})
    token = await peering.invite(b, "a")
    await peering.grant(b, "a", kinds=["task"], workspaces=["shared"],
                        command_types=["resource.put"])
    assert peering.join_cli(token, a).returncode == 0
    b.stop()
    async with a.client() as tool:
        reasons = []
        for i in range(6):
            put_req = put("shared", "task", f"t{i}", key=f"k-down-{i}")
            put_req.target = "b"
            err = await rpc_error(tool.command.Execute(put_req))
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            assert "peer b" in (err.details() or "")
            reasons.append(reason_of(err))
    assert reasons == ["PEER_UNAVAILABLE"] * 6
    kept = sql(a, "SELECT idempotency_key FROM operations WHERE state = 'FORWARDED'"
                  " ORDER BY idempotency_key")
    assert kept == [("k-down-0",), ("k-down-1",)]  # the two that were sent


async def test_one_local_caller_cannot_fill_the_channel_to_a_peer_with_watches(
        evil: tuple[NodeProcess, EvilB]) -> None:
    """Attack (DoS): every forwarded WatchOperation is a stream on A's one channel to B,
    shared by all of A's callers and by fan-out. One local tool could open them without
    bound (each held while B's run lasts) until B's max_concurrent_streams stalls every
    other tool's calls to B (and their timeouts open the circuit). A caps the relayed
    watches per local caller; another caller is not affected."""
    a, servicer = evil
    put_req = put("shared", "task", "endless", key="k-endless")
    put_req.target = "b"
    async with a.client() as tool, a.client("admin") as other:
        op = await tool.command.Execute(put_req)
        theirs = await other.command.Execute(put_req)
        calls = []
        for _ in range(MAX_FORWARDED_WATCHES):
            call = tool.command.WatchOperation(command_pb2.WatchOperationRequest(name=op.name))
            first = await call.read()
            assert first.name == op.name and not first.done
            calls.append(call)
        one_more = tool.command.WatchOperation(command_pb2.WatchOperationRequest(name=op.name))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await one_more.read()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert servicer.watching == MAX_FORWARDED_WATCHES
        # Another local caller still reaches B.
        call = other.command.WatchOperation(command_pb2.WatchOperationRequest(name=theirs.name))
        assert (await call.read()).name == theirs.name
        call.cancel()
        # Closing one frees its place (and its stream to B).
        calls.pop().cancel()
        await wait_until(lambda: servicer.watching == MAX_FORWARDED_WATCHES - 1,
                         "a to end the stream to b of the watch its caller left")
        again = tool.command.WatchOperation(command_pb2.WatchOperationRequest(name=op.name))
        assert (await again.read()).name == op.name
        for c in (*calls, again):
            c.cancel()


async def test_a_peer_going_away_mid_watch_is_unavailable_naming_it(
        evil: tuple[NodeProcess, EvilB]) -> None:
    """Held: B stops while A relays a watch: UNAVAILABLE naming the peer, not UNKNOWN."""
    a, servicer = evil
    put_req = put("shared", "task", "endless", key="k-gone")
    put_req.target = "b"
    async with a.client() as tool:
        op = await tool.command.Execute(put_req)
        call = tool.command.WatchOperation(command_pb2.WatchOperationRequest(name=op.name))
        assert (await call.read()).name == op.name
        assert servicer.server is not None
        await servicer.server.stop(grace=None)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        assert "peer b" in (err.value.details() or "")


async def test_odd_targets_and_requests_get_field_errors_never_unknown(
        node_factory: NodeFactory, peering: Peering) -> None:
    """Held: lookalike, padded, path-like, over-long targets; missing parts of a forwarded
    request; names that are not operations. Each answer names the field; nothing stored."""
    b = node_factory(name="b")
    a, _grant = await _joined(node_factory, peering, b, command_types=["resource.put"])
    async with a.client() as tool:
        for target, code, field in [
                (" b", grpc.StatusCode.FAILED_PRECONDITION, "target"),
                ("b ", grpc.StatusCode.FAILED_PRECONDITION, "target"),
                ("B", grpc.StatusCode.FAILED_PRECONDITION, "target"),
                ("\u0431", grpc.StatusCode.FAILED_PRECONDITION, "target"),  # Cyrillic be
                ("b\u200b", grpc.StatusCode.FAILED_PRECONDITION, "target"),
                ("../b", grpc.StatusCode.FAILED_PRECONDITION, "target"),
                ("peers/b", grpc.StatusCode.FAILED_PRECONDITION, "target"),
                ("*", grpc.StatusCode.FAILED_PRECONDITION, "target"),
                ("b" * 129, grpc.StatusCode.INVALID_ARGUMENT, "target")]:
            put_req = put("shared", "task", "t", key="k-odd")
            put_req.target = target
            err = await rpc_error(tool.command.Execute(put_req))
            assert err.code() == code, (target, err)
            assert bad_fields(err) == [field], (target, err)
        for request, field in [
                (command_pb2.ExecuteRequest(target="b"), "idempotency_key"),
                (command_pb2.ExecuteRequest(target="b", idempotency_key="k"), "command"),
                (command_pb2.ExecuteRequest(target="b", idempotency_key="k",
                                            plugin=command_pb2.PluginCommand()),
                 "plugin.type")]:
            err = await rpc_error(tool.command.Execute(request))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
            assert field in bad_fields(err), err
        for name in ("operations/x", "operations/" + "0" * 89, "nope"):
            for call in (tool.command.GetOperation(command_pb2.GetOperationRequest(name=name)),
                         tool.command.CancelOperation(
                             command_pb2.CancelOperationRequest(name=name))):
                err = await rpc_error(call)
                assert err.code() in (grpc.StatusCode.NOT_FOUND,
                                      grpc.StatusCode.INVALID_ARGUMENT), (name, err)
    # A peer of a: any non-empty target, however it is spelled, is refused first.
    as_peer = await peering.link(a, "p", kinds=["task"], workspaces=["shared"],
                                 command_types=["resource.put"])
    for target in (" ", "\u200b", "b", "B", "\t", "a"):
        put_req = put("shared", "task", "t", key="k-peer")
        put_req.target = target
        err = await rpc_error(as_peer.command.Execute(put_req))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (target, err)
        assert reason_of(err) == "FORWARD_NOT_ALLOWED", (target, err)
    assert sql(a, "SELECT count(*) FROM operations") == [(0,)]
    assert sql(a, "SELECT count(*) FROM audit_log WHERE service = 'tessera.forward'") \
        == [(0,)]
    assert "unhandled error" not in a.log()


async def test_a_peers_words_reach_the_operators_terminal_without_control_characters(
        evil: tuple[NodeProcess, EvilB]) -> None:
    """Attack: B's refusal carries terminal escapes (erase the line, move up, print a fake
    success). `tessera agents spawn --target b` printed the relayed message raw to the
    operator's terminal on A. The command line shows control characters escaped."""
    a, _servicer = evil
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tessera.cli", "agents", "spawn", "probe", "--target", "b",
         "--data-dir", str(a.data_dir)],
        env=a.env, text=True, capture_output=True, timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    assert "PERMISSION_DENIED" in done.stderr and "peer b" in done.stderr, done.stderr
    assert not any(ch in done.stderr for ch in "\x1b\x07\r"), repr(done.stderr)
    assert "\\x1b[2K" in done.stderr  # shown, escaped


async def test_a_cancel_sent_to_a_peer_is_audited_on_the_sender_before_any_answer(
        evil: tuple[NodeProcess, EvilB]) -> None:
    """Attack (audit gap): B cancels a run but its answer is lost. A wrote its
    `tessera.forward` CancelOperation record only after B's answer, so B's audit showed a
    cancel from A that no record on A tied to a local caller. Recorded before it leaves."""
    a, servicer = evil
    put_req = put("shared", "task", "endless", key="k-cancel")
    put_req.target = "b"
    async with a.client() as tool:
        op = await tool.command.Execute(put_req)
        err = await rpc_error(tool.command.CancelOperation(
            command_pb2.CancelOperationRequest(name=op.name)))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
    [(remote,)] = sql(a, "SELECT forward_operation FROM operations"
                         " WHERE idempotency_key = 'k-cancel'")
    assert servicer.cancelled == [remote]
    rows = await audit_rows(a, "service = 'tessera.forward' AND method = 'CancelOperation'",
                            (), "a's record of the cancel it sent")
    assert [(r[0], r[7]["target"], r[7]["operation"], r[7]["remote_operation"])
            for r in rows] == [(op.caller, "b", op.name, remote)]


async def test_a_suspended_or_revoked_sender_is_refused_by_the_peer_and_keeps_nothing(
        node_factory: NodeFactory, peering: Peering) -> None:
    """Held: B suspends, then revokes, A. A forwarded Execute is refused as B refused it
    (PERMISSION_DENIED, never UNKNOWN), A keeps no reservation, and Get/Cancel of an
    earlier forwarded operation are refused the same way."""
    b = node_factory(name="b")
    a, _grant = await _joined(node_factory, peering, b, command_types=["resource.put"])
    async with a.client() as tool, b.client("admin") as admin:
        put_req = put("shared", "task", "t0", key="k-before")
        put_req.target = "b"
        before = await tool.command.Execute(put_req)
        for i, (change, request) in enumerate([
                (admin.admin.SuspendPeer, admin_pb2.SuspendPeerRequest(name="a")),
                (admin.admin.RevokePeer, admin_pb2.RevokePeerRequest(name="a"))]):
            await change(request)
            put_req = put("shared", "task", f"t{i + 1}", key=f"k-after-{i}")
            put_req.target = "b"
            err = await rpc_error(tool.command.Execute(put_req))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
            assert sql(a, "SELECT count(*) FROM operations WHERE idempotency_key = %s",
                       (f"k-after-{i}",)) == [(0,)]
            for call in (tool.command.GetOperation(
                    command_pb2.GetOperationRequest(name=before.name)),
                         tool.command.CancelOperation(
                    command_pb2.CancelOperationRequest(name=before.name))):
                err = await rpc_error(call)
                assert err.code() in (grpc.StatusCode.PERMISSION_DENIED,
                                      grpc.StatusCode.FAILED_PRECONDITION), err
    assert "unhandled error" not in a.log()
