"""Long-running operations against real node processes and a real PostgreSQL.

Handlers come from the test plugin (tests/plugins/tessera_test_commands.py), installed for
the node processes as a distribution with `tessera.commands` entry points. Each handler
appends a "start ..." line to the file named by its `path` argument per start, which is
how these tests count handler starts.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psycopg
import pytest
from google.protobuf import struct_pb2

from tessera_client.pb import command_pb2, query_pb2, resources_pb2
from tests.fixtures.calls import bad_fields, reason_of, run_cli
from tests.fixtures.nodes import NodeFactory, NodeProcess
from tests.fixtures.plugins import plugin_source

T = TypeVar("T")
S = command_pb2
#: Short leases and sweeps so recovery happens within a test; nothing asserts on time.
FAST = {
    "TESSERA_OPERATIONS_LEASE_TTL_S": "2",
    "TESSERA_OPERATIONS_SWEEP_INTERVAL_S": "0.3",
    "TESSERA_OPERATIONS_CLAIM_GRACE_S": "1",
    "TESSERA_OPERATIONS_CANCEL_GRACE_S": "2",
}
DEADLINE_S = 60.0


@pytest.fixture
def make_node(node_factory: NodeFactory, plugin_env: dict[str, str]) -> Callable[..., NodeProcess]:
    """Nodes with the test plugin installed and fast leases."""

    def make(*, share_with: NodeProcess | None = None, **env: str) -> NodeProcess:
        e = {**plugin_env, **FAST, **env}
        if share_with is not None:
            e["TESSERA_STORE_DSN"] = share_with.env["TESSERA_STORE_DSN"]
        return node_factory(env=e)

    return make


def plugin(key: str, command_type: str, **args: Any) -> command_pb2.ExecuteRequest:
    """An Execute request of a plugin command."""
    s = struct_pb2.Struct()
    s.update(args)
    return command_pb2.ExecuteRequest(
        idempotency_key=key, plugin=command_pb2.PluginCommand(type=command_type, args=s))


def starts(path: Path) -> list[str]:
    """The "start ..." lines the handlers wrote."""
    if not path.exists():
        return []
    return [ln for ln in path.read_text().splitlines() if ln.startswith("start ")]


def sql(node: NodeProcess, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(node.env["TESSERA_STORE_DSN"], autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def op_uuid(name: str) -> str:
    return name.removeprefix("operations/")


async def until(probe: Callable[[], Awaitable[T | None]], what: str,
                deadline_s: float = DEADLINE_S) -> T:
    """Poll `probe` until it returns something truthy; fail naming `what` at the deadline."""
    end = time.monotonic() + deadline_s
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


async def in_state(node: NodeProcess, name: str, state: int) -> command_pb2.Operation:
    async with node.client() as c:
        async def probe() -> command_pb2.Operation | None:
            op = await c.command.GetOperation(command_pb2.GetOperationRequest(name=name))
            return op if op.state == state else None

        return await until(probe, f"{name} to reach {command_pb2.OperationState.Name(state)}")




async def collect_watch(node: NodeProcess, name: str,
                        seen: list[command_pb2.Operation]) -> None:
    async with node.client() as c:
        async for op in c.command.WatchOperation(command_pb2.WatchOperationRequest(name=name)):
            seen.append(op)


# -- at most one start per key --------------------------------------------------------


async def test_twenty_concurrent_executes_with_one_key_start_the_handler_once(
    make_node: Callable[..., NodeProcess], tmp_path: Path,
) -> None:
    node = make_node()
    side = tmp_path / "count.txt"
    req = plugin("same-key", "test.count", path=str(side))
    async with node.client() as c:
        ops = await asyncio.gather(*(c.command.Execute(req) for _ in range(20)))
        assert len({o.name for o in ops}) == 1
        assert all(o.state in (S.OPERATION_STATE_PENDING, S.OPERATION_STATE_RUNNING,
                               S.OPERATION_STATE_SUCCEEDED) for o in ops)
        final = await done_op(node, ops[0].name)
        assert final.state == S.OPERATION_STATE_SUCCEEDED
        assert dict(final.output) == {"lines": 1.0}
        # A replay after the end returns the same finished operation and starts nothing.
        again = await c.command.Execute(req)
        assert again.name == final.name and again.state == S.OPERATION_STATE_SUCCEEDED
        listed = await c.command.ListOperations(
            command_pb2.ListOperationsRequest(command_type="test.count"))
        assert [o.name for o in listed.operations] == [final.name]
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.command.Execute(plugin("same-key", "test.count", path=str(side),
                                           note="another payload"))
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason_of(exc.value) == "IDEMPOTENCY_KEY_REUSED"
    assert len(starts(side)) == 1


async def test_one_key_sent_to_two_node_processes_at_once_starts_the_handler_once(
    make_node: Callable[..., NodeProcess], tmp_path: Path,
) -> None:
    a = make_node()
    b = make_node(share_with=a)
    side = tmp_path / "count.txt"
    req = plugin("twice", "test.count", path=str(side))
    async with a.client() as ca, b.client() as cb:
        ops = await asyncio.gather(*(c.command.Execute(req) for c in [ca, cb] * 10))
    assert len({o.name for o in ops}) == 1
    assert (await done_op(a, ops[0].name)).state == S.OPERATION_STATE_SUCCEEDED
    assert len(starts(side)) == 1
    assert sql(a, "SELECT count(*) FROM operations") == [(1,)]


async def test_concurrent_built_in_commands_with_one_key_take_effect_once(
    make_node: Callable[..., NodeProcess],
) -> None:
    a = make_node()
    b = make_node(share_with=a)
    req = command_pb2.ExecuteRequest(
        idempotency_key="put-once", put_resource=command_pb2.PutResourceCommand(
            resource=resources_pb2.Resource(workspace="w", kind="task", id="once")))
    async with a.client() as ca, b.client() as cb:
        ops = await asyncio.gather(*(c.command.Execute(req) for c in [ca, cb] * 10))
    assert len({o.name for o in ops}) == 1 and all(o.done for o in ops)
    assert sql(a, "SELECT version FROM resources") == [(1,)]
    assert sql(a, "SELECT count(*) FROM events WHERE type = 'task.put'") == [(1,)]


# -- leases, recovery and crashes ----------------------------------------------------


async def test_a_renewed_lease_is_never_recovered_and_a_killed_runner_ends_failed(
    make_node: Callable[..., NodeProcess], tmp_path: Path,
) -> None:
    a = make_node()
    b = make_node(share_with=a)
    side = tmp_path / "sleep.txt"
    async with a.client() as c:
        op = await c.command.Execute(plugin("long", "test.sleep", path=str(side),
                                            steps=1000, seconds=3600))
    await in_state(a, op.name, S.OPERATION_STATE_RUNNING)
    watched: list[command_pb2.Operation] = []
    watch = asyncio.create_task(collect_watch(b, op.name, watched))
    (owner, first_expiry), = sql(a, "SELECT lease_owner, lease_expires FROM operations")
    # B sweeps every 0.3 s; the lease (2 s) is renewed every ~0.7 s. Wait for several
    # renewals: B must neither recover nor start the operation meanwhile.
    expiries = {first_expiry}

    async def renewed_often() -> bool:
        rows = sql(a, "SELECT lease_owner, lease_expires, state, attempts FROM operations")
        (lease_owner, expiry, state, attempts), = rows
        assert (lease_owner, state, attempts) == (owner, "RUNNING", 1)
        expiries.add(expiry)
        return len(expiries) >= 5

    await until(renewed_often, "five lease renewals")
    assert len(starts(side)) == 1
    assert any(f":{pid}:" in owner for pid in a.serving_pids)

    a.crash()
    final = await done_op(b, op.name)
    assert final.state == S.OPERATION_STATE_FAILED
    assert reason_of(final.error) == "NODE_RESTARTED"
    assert final.error.code == grpc.StatusCode.ABORTED.value[0]
    assert len(starts(side)) == 1, "a handler that is not retry-safe was started again"
    # The key still names that operation after the crash: a retry starts nothing.
    async with b.client() as c:
        again = await c.command.Execute(plugin("long", "test.sleep", path=str(side),
                                               steps=1000, seconds=3600))
    assert again.name == op.name and again.state == S.OPERATION_STATE_FAILED
    assert len(starts(side)) == 1
    await asyncio.wait_for(watch, DEADLINE_S)
    assert watched[-1].state == S.OPERATION_STATE_FAILED and watched[-1].done
    assert sql(b, "SELECT count(*) FROM operations WHERE state = 'RUNNING'") == [(0,)]


async def test_a_retry_safe_handler_is_started_again_after_its_node_died(
    make_node: Callable[..., NodeProcess], tmp_path: Path,
) -> None:
    a = make_node()
    b = make_node(share_with=a)
    side, gate = tmp_path / "resume.txt", tmp_path / "gate"
    async with a.client() as c:
        op = await c.command.Execute(plugin("resume", "test.resumable", path=str(side),
                                            gate=str(gate), steps=2, seconds=0.2))
    await in_state(a, op.name, S.OPERATION_STATE_RUNNING)
    a.crash()

    async def second_start() -> bool:
        return len(starts(side)) == 2

    await until(second_start, "the second start on the surviving node")
    gate.touch()
    final = await done_op(b, op.name)
    assert final.state == S.OPERATION_STATE_SUCCEEDED
    assert final.attempts == 2 and final.output["attempt"] == 2
    assert [ln.split()[-1] for ln in starts(side)] == ["1", "2"]


async def test_a_graceful_stop_ends_its_running_operations_explicitly(
    make_node: Callable[..., NodeProcess], tmp_path: Path,
) -> None:
    a = make_node(TESSERA_OPERATIONS_LEASE_TTL_S="3600")
    async with a.client() as c:
        op = await c.command.Execute(plugin("stop", "test.sleep", path=str(tmp_path / "s"),
                                            steps=1000, seconds=3600))
    await in_state(a, op.name, S.OPERATION_STATE_RUNNING)
    assert a.stop() == 0
    # The lease would last an hour: only the release at shutdown can have ended it.
    assert sql(a, "SELECT state, error_reason, lease_owner FROM operations") == \
        [("FAILED", "NODE_RESTARTED", None)]


async def test_work_a_full_node_cannot_start_is_started_by_another_node(
    make_node: Callable[..., NodeProcess], tmp_path: Path,
) -> None:
    a = make_node(TESSERA_OPERATIONS_MAX_RUNNING="1")
    b = make_node(share_with=a)
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    async with a.client() as c:
        busy = await c.command.Execute(plugin("busy", "test.sleep", path=str(first),
                                              steps=1000, seconds=3600))
        await in_state(a, busy.name, S.OPERATION_STATE_RUNNING)
        waiting = await c.command.Execute(plugin("waits", "test.count", path=str(second)))
    final = await done_op(a, waiting.name)
    assert final.state == S.OPERATION_STATE_SUCCEEDED
    assert len(starts(second)) == 1
    # A is still busy with the first, so the second ran in B.
    assert sql(a, "SELECT state FROM operations WHERE name = %s", (op_uuid(busy.name),)) == \
        [("RUNNING",)]
    (runner,), = sql(a, "SELECT data->>'runner' FROM events WHERE type = 'operation.running'"
                        " AND resource_id = %s", (op_uuid(waiting.name),))
    assert any(f":{pid}:" in runner for pid in b.serving_pids)


async def test_a_pending_operation_is_cancelled_before_its_handler_starts(
    make_node: Callable[..., NodeProcess], tmp_path: Path,
) -> None:
    node = make_node(TESSERA_OPERATIONS_MAX_RUNNING="1")
    later = tmp_path / "later.txt"
    async with node.client() as c:
        busy = await c.command.Execute(plugin("busy", "test.sleep", path=str(tmp_path / "b"),
                                              steps=1000, seconds=3600))
        await in_state(node, busy.name, S.OPERATION_STATE_RUNNING)
        waiting = await c.command.Execute(plugin("later", "test.count", path=str(later)))
        assert waiting.state == S.OPERATION_STATE_PENDING
        cancelled = await c.command.CancelOperation(
            command_pb2.CancelOperationRequest(name=waiting.name))
        assert cancelled.state == S.OPERATION_STATE_CANCELLED and cancelled.done
        await c.command.CancelOperation(command_pb2.CancelOperationRequest(name=busy.name))
        await in_state(node, busy.name, S.OPERATION_STATE_CANCELLED)
        # With the slot free again, a sweep would have started the second if it could.
        fresh = await c.command.Execute(plugin("fresh", "test.count", path=str(later)))
        await done_op(node, fresh.name)
    assert [ln.split()[1] for ln in starts(later)] == [fresh.name]


# -- watch, cancel, progress -----------------------------------------------------------


async def test_watch_from_the_other_process_sees_every_state_and_progress_change(
    make_node: Callable[..., NodeProcess], tmp_path: Path,
) -> None:
    a = make_node()
    b = make_node(share_with=a)
    gate = tmp_path / "gate"
    async with a.client() as c:
        op = await c.command.Execute(plugin("watched", "test.sleep", path=str(tmp_path / "w"),
                                            gate=str(gate), steps=5, seconds=0))
    seen: list[command_pb2.Operation] = []
    watch = asyncio.create_task(collect_watch(b, op.name, seen))

    async def first_message() -> bool:
        return bool(seen)

    await until(first_message, "the watch's first message")
    gate.touch()
    await asyncio.wait_for(watch, DEADLINE_S)
    states = [m.state for m in seen]
    assert states == sorted(states), "states went backwards"
    assert states[-1] == S.OPERATION_STATE_SUCCEEDED and seen[-1].done
    assert S.OPERATION_STATE_RUNNING in states
    assert [m.progress.message for m in seen[:-1] if m.progress.message.startswith("step")] == \
        [f"step {i}" for i in range(1, 6)]
    assert dict(seen[-1].output)["steps"] == 5
    assert all(not m.done for m in seen[:-1])


async def test_streamed_output_reaches_a_watcher_in_the_other_process_complete_and_in_order(
    make_node: Callable[..., NodeProcess], tmp_path: Path,
) -> None:
    a = make_node()
    b = make_node(share_with=a)
    gate = tmp_path / "gate"
    async with a.client() as c:
        op = await c.command.Execute(plugin("chatty", "test.sleep", path=str(tmp_path / "c"),
                                            gate=str(gate), steps=3, lines=2000, seconds=0))
    seen: list[command_pb2.Operation] = []
    watch = asyncio.create_task(collect_watch(b, op.name, seen))

    async def first_message() -> bool:
        return bool(seen)

    await until(first_message, "the watch's first message")
    gate.touch()
    await asyncio.wait_for(watch, DEADLINE_S)
    text = "".join(m.output_chunk for m in seen)
    assert text == "".join(f"step {i} line {j}\n" for i in range(1, 4) for j in range(2000))
    chunks = [m for m in seen if m.output_chunk]
    # Coalesced: far fewer writes than lines.
    assert 1 < len(chunks) < 100
    assert seen[-1].state == S.OPERATION_STATE_SUCCEEDED


async def test_cancel_through_the_other_process_reaches_the_running_handler(
    make_node: Callable[..., NodeProcess], tmp_path: Path,
) -> None:
    a = make_node()
    b = make_node(share_with=a)
    side = tmp_path / "cancel.txt"
    async with a.client() as c:
        op = await c.command.Execute(plugin("cancel-me", "test.sleep", path=str(side),
                                            steps=1000, seconds=3600))
    await in_state(a, op.name, S.OPERATION_STATE_RUNNING)
    async with b.client() as c:
        accepted = await c.command.CancelOperation(
            command_pb2.CancelOperationRequest(name=op.name))
        assert accepted.cancel_requested
        final = await done_op(b, op.name)
        assert final.state == S.OPERATION_STATE_CANCELLED
        assert final.error.code == grpc.StatusCode.CANCELLED.value[0]
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.command.CancelOperation(command_pb2.CancelOperationRequest(name=op.name))
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason_of(exc.value) == "OPERATION_DONE"
    lines = side.read_text().splitlines()
    assert "hook" in lines and "cancelled" in lines, lines


async def test_operations_are_visible_to_their_caller_only(
    make_node: Callable[..., NodeProcess], tmp_path: Path,
) -> None:
    node = make_node()
    async with node.client() as c:
        op = await c.command.Execute(plugin("mine", "test.count", path=str(tmp_path / "m")))
    await done_op(node, op.name)
    async with node.client("admin") as other:
        for call in (other.command.GetOperation(command_pb2.GetOperationRequest(name=op.name)),
                     other.command.CancelOperation(
                         command_pb2.CancelOperationRequest(name=op.name))):
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await call
            assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for _ in other.command.WatchOperation(
                    command_pb2.WatchOperationRequest(name=op.name)):
                pass
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await other.command.ListOperations(command_pb2.ListOperationsRequest())
        assert list(listed.operations) == []


# -- handler failures, timeouts, validation -------------------------------------------


async def test_a_raising_handler_ends_failed_with_its_message_and_the_node_keeps_serving(
    make_node: Callable[..., NodeProcess], tmp_path: Path,
) -> None:
    node = make_node()
    async with node.client() as c:
        op = await c.command.Execute(plugin("fail", "test.fail", path=str(tmp_path / "f"),
                                            why="disk on fire"))
        final = await done_op(node, op.name)
        assert final.state == S.OPERATION_STATE_FAILED
        assert "boom: disk on fire" in final.error.message
        assert reason_of(final.error) == "HANDLER_ERROR"
        slow = await c.command.Execute(plugin("slow", "test.slowpoke", path=str(tmp_path / "s")))
        final = await done_op(node, slow.name)
        assert final.state == S.OPERATION_STATE_FAILED
        assert final.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert reason_of(final.error) == "HANDLER_TIMEOUT"
        # One that ignores the cancellation after its timeout still ends (after the grace).
        stubborn = await c.command.Execute(plugin("stubborn", "test.stubborn",
                                                  path=str(tmp_path / "st"), ignore_s=30))
        final = await done_op(node, stubborn.name)
        assert final.state == S.OPERATION_STATE_FAILED
        assert reason_of(final.error) == "HANDLER_TIMEOUT"
        assert "ignoring cancellation" in (tmp_path / "st").read_text()
        await c.query.Describe(query_pb2.DescribeRequest())
    assert node.proc is not None and node.proc.poll() is None


@pytest.mark.parametrize(("args", "field"), [
    ({}, "plugin.args.path"),
    ({"path": 3}, "plugin.args.path"),
    ({"path": "/x", "steps": 0}, "plugin.args.steps"),
    ({"path": "/x", "colour": "red"}, "plugin.args"),
])
async def test_plugin_arguments_are_checked_against_the_schema_before_anything_runs(
    make_node: Callable[..., NodeProcess], args: dict[str, Any], field: str,
) -> None:
    node = make_node()
    async with node.client() as c:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.command.Execute(plugin("bad", "test.sleep", **args))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_fields(exc.value) == [field]
        listed = await c.command.ListOperations(command_pb2.ListOperationsRequest())
        assert list(listed.operations) == []


# -- plugins are discovered -----------------------------------------------------------


async def test_a_third_party_handler_is_listed_in_describe(
    make_node: Callable[..., NodeProcess],
) -> None:
    node = make_node()
    async with node.client() as c:
        types = await c.command.ListCommandTypes(command_pb2.ListCommandTypesRequest())
        by_type = {t.type: t for t in types.command_types}
        assert {"resource.put", "resource.delete", "resource.batch_put"} <= set(by_type)
        assert by_type["test.sleep"].source == plugin_source()
        assert by_type["test.sleep"].cancel_hook and by_type["test.sleep"].long_running
        assert by_type["test.resumable"].retry_safe
        assert by_type["test.slowpoke"].timeout_seconds == 1.0
        assert by_type["test.count"].input_schema["required"] == ["path"]
        assert not by_type["resource.put"].long_running
        # The broken entry point was skipped without stopping the node.
        assert "test.broken" not in by_type
        described = await c.query.Describe(query_pb2.DescribeRequest())
        assert [t.type for t in described.command_types] == sorted(by_type)


def test_tessera_commands_list_shows_plugins_and_why_one_did_not_load(
    plugin_env: dict[str, str],
) -> None:
    env = {**os.environ, **plugin_env}
    out = run_cli(None, "commands", "list", env=env)
    assert out.returncode == 0, out.stderr
    assert "test.sleep" in out.stdout and plugin_source() in out.stdout
    assert "test.broken" in out.stdout  # reported as not loaded, with why


# -- listing, built-ins, pruning -------------------------------------------------------


async def test_list_operations_filters_by_state_and_type_and_pages(
    make_node: Callable[..., NodeProcess], tmp_path: Path,
) -> None:
    node = make_node()
    async with node.client() as c:
        names = []
        for i in range(5):
            op = await c.command.Execute(plugin(f"n{i}", "test.count", path=str(tmp_path / "n")))
            names.append((await done_op(node, op.name)).name)
        failed = await c.command.Execute(plugin("f", "test.fail", path=str(tmp_path / "f")))
        await done_op(node, failed.name)
        await c.command.Execute(command_pb2.ExecuteRequest(
            idempotency_key="put", put_resource=command_pb2.PutResourceCommand(
                resource=resources_pb2.Resource(workspace="w", kind="task", id="t"))))
        got: list[str] = []
        token = ""
        while True:
            page = await c.command.ListOperations(command_pb2.ListOperationsRequest(
                page_size=2, page_token=token, command_type="test.count",
                state=S.OPERATION_STATE_SUCCEEDED))
            got += [o.name for o in page.operations]
            token = page.next_page_token
            if not token:
                break
        assert got == list(reversed(names))
        only_failed = await c.command.ListOperations(command_pb2.ListOperationsRequest(
            state=S.OPERATION_STATE_FAILED))
        assert [o.name for o in only_failed.operations] == [failed.name]
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.command.ListOperations(command_pb2.ListOperationsRequest(
                page_size=2, page_token="not-a-token", command_type="test.fail"))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_batch_put_writes_all_or_nothing_once_per_key(
    make_node: Callable[..., NodeProcess],
) -> None:
    node = make_node()

    def batch(key: str, *ids: str, etag: str = "") -> command_pb2.ExecuteRequest:
        return command_pb2.ExecuteRequest(
            idempotency_key=key,
            batch_put_resources=command_pb2.BatchPutResourcesCommand(puts=[
                command_pb2.PutResourceCommand(
                    resource=resources_pb2.Resource(workspace="b", kind="task", id=i, title=i),
                    expected_etag=etag if i == ids[-1] else "")
                for i in ids]))

    async with node.client() as c:
        op = await c.command.Execute(batch("b1", "x", "y", "z"))
        assert op.state == S.OPERATION_STATE_SUCCEEDED and op.command_type == "resource.batch_put"
        assert [r.id for r in op.batch_result.resources] == ["x", "y", "z"]
        assert (await c.command.Execute(batch("b1", "x", "y", "z"))).name == op.name
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.command.Execute(batch("b2", "p", "q", etag="v99"))
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.command.Execute(batch("b3", "x", "x"))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sql(node, "SELECT id, version FROM resources ORDER BY id") == \
        [("x", 1), ("y", 1), ("z", 1)]
    assert sql(node, "SELECT count(*) FROM events WHERE type = 'task.put'") == [(3,)]


async def test_operation_changes_are_events_and_finished_ones_are_pruned(
    make_node: Callable[..., NodeProcess], tmp_path: Path,
) -> None:
    # A retention of about a second: pruning runs every half of it.
    node = make_node(TESSERA_OPERATIONS_RETENTION_H="0.0003")
    async with node.client() as c:
        op = await c.command.Execute(plugin("ev", "test.sleep", path=str(tmp_path / "e"),
                                            steps=2, seconds=0))
        await done_op(node, op.name)
        types = [t for (t,) in sql(node, "SELECT type FROM events WHERE kind = 'operation'"
                                         " AND resource_id = %s ORDER BY sequence",
                                   (op_uuid(op.name),))]
        assert types == ["operation.pending", "operation.running", "operation.progress",
                         "operation.progress", "operation.succeeded"]

        async def pruned() -> bool:
            try:
                await c.command.GetOperation(command_pb2.GetOperationRequest(name=op.name))
            except grpc.aio.AioRpcError as exc:
                return exc.code() == grpc.StatusCode.NOT_FOUND
            return False

        await until(pruned, "the finished operation to be pruned")
