"""What forwarding a command to a peer costs over executing it on the peer directly.

Two real nodes: a tool on A puts resources on B through A (ExecuteRequest.target) and
reads them back through A (GetOperation relayed), against the same calls made by a tool
on B itself and by A's node identity calling B directly (the hop A adds), in one run.
Prints latencies and ratios; asserts only that every call did what it should (timing is
not a pass/fail matter on a shared machine).
Run: pytest tests/bench/test_forward_cost.py -q -s
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Awaitable, Callable

from tessera_client.pb import admin_pb2, command_pb2
from tests.fixtures.calls import put
from tests.fixtures.nodes import NodeFactory
from tests.fixtures.peers import Peering

CALLS = 200


async def _timed(n: int, call: Callable[[int], Awaitable[object]]) -> list[float]:
    out = []
    for i in range(n):
        started = time.perf_counter()
        await call(i)
        out.append((time.perf_counter() - started) * 1000)
    return out


def _summary(ms: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(ms, n=20)
    return statistics.median(ms), q[18]


async def test_forwarded_execute_and_get_cost(node_factory: NodeFactory,
                                              peering: Peering) -> None:
    b = node_factory(name="b")
    a = node_factory(name="a")
    token = await peering.invite(b, "a")
    await peering.grant(b, "a", kinds=["task"], workspaces=["shared"],
                        command_types=["resource.put"],
                        # Sequential calls here outrun the default peer limit (20/s).
                        rate_limit=admin_pb2.RateLimit(rate_per_s=10_000, burst=10_000))
    assert peering.join_cli(token, a).returncode == 0
    as_a = peering.outbound(a, "b").client()  # a's own peer channel, for a baseline
    peering.clients.append(as_a)
    async with a.client() as via_a, b.client() as on_b:
        names: dict[str, list[str]] = {"direct": [], "forwarded": [], "peer": []}

        async def as_peer(i: int) -> None:
            op = await as_a.command.Execute(put("shared", "task", f"p{i}",
                                                        key=f"p{i}"))
            assert op.state == command_pb2.OPERATION_STATE_SUCCEEDED
            names["peer"].append(op.name)

        async def direct(i: int) -> None:
            op = await on_b.command.Execute(put("shared", "task", f"d{i}",
                                                        key=f"d{i}"))
            assert op.state == command_pb2.OPERATION_STATE_SUCCEEDED
            names["direct"].append(op.name)

        async def forwarded(i: int) -> None:
            req = put("shared", "task", f"f{i}", key=f"f{i}")
            req.target = "b"
            op = await via_a.command.Execute(req)
            assert op.state == command_pb2.OPERATION_STATE_SUCCEEDED and op.target == "b"
            names["forwarded"].append(op.name)

        await _timed(10, lambda i: direct(10_000 + i))  # warm both channels and pools
        await _timed(10, lambda i: forwarded(10_000 + i))
        await _timed(10, lambda i: as_peer(10_000 + i))
        results = {"execute direct": await _timed(CALLS, direct),
                   "execute as peer": await _timed(CALLS, as_peer),
                   "execute forwarded": await _timed(CALLS, forwarded)}

        async def get_direct(i: int) -> None:
            await on_b.command.GetOperation(command_pb2.GetOperationRequest(
                name=names["direct"][i]))

        async def get_forwarded(i: int) -> None:
            op = await via_a.command.GetOperation(command_pb2.GetOperationRequest(
                name=names["forwarded"][i]))
            assert op.done and op.target == "b"

        async def get_as_peer(i: int) -> None:
            await as_a.command.GetOperation(command_pb2.GetOperationRequest(
                name=names["peer"][i]))

        results["get direct"] = await _timed(CALLS, get_direct)
        results["get as peer"] = await _timed(CALLS, get_as_peer)
        results["get forwarded"] = await _timed(CALLS, get_forwarded)
    load = os.getloadavg()[0]
    print(f"\n{CALLS} sequential calls each, 1-minute load {load:.1f} on {os.cpu_count()} CPUs")
    for what, ms in results.items():
        p50, p95 = _summary(ms)
        print(f"{what:20} p50 {p50:7.2f} ms  p95 {p95:7.2f} ms")
    for verb in ("execute", "get"):
        for base in ("direct", "as peer"):
            ratio = statistics.median(results[f"{verb} forwarded"]) \
                / statistics.median(results[f"{verb} {base}"])
            print(f"{verb}: forwarded / {base} p50 = {ratio:.2f}")
