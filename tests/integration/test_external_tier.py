"""The external tier under traffic: two nodes of two serving processes each, on one
standalone PostgreSQL and one Valkey (TCP, passwords), with clients spread over all four
processes.

The two nodes are replicas of one node identity (the second serves the first's
certificate files), so a client may call either; everything they share lives in the
database and in Valkey, and must stay correct whichever process answers.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import grpc

from tessera.core.paths import NodePaths
from tessera_client.pb import (
    admin_pb2,
    admin_pb2_grpc,
    command_pb2,
    command_pb2_grpc,
    query_pb2_grpc,
)
from tests.fixtures.external import ExternalServices, external_database
from tests.fixtures.nodes import NodeFactory, NodeProcess
from tests.fixtures.waiting import wait_until
from tests.fixtures.workers import (
    credentials,
    fresh_channel,
    get_note,
    handled,
    put_note,
    scrape,
    serving,
    workers_env,
)


def _two_replicas(node_factory: NodeFactory, ext: ExternalServices,
                  **extra: str) -> tuple[NodeProcess, NodeProcess]:
    env = {"TESSERA_STORE_DSN": external_database(ext), "TESSERA_VALKEY_URL": ext.valkey_url,
           **extra}
    first = node_factory(env=workers_env(2, **env))
    pki = first.pki
    second = node_factory(env=workers_env(
        2, **env, TESSERA_TLS_CERT_FILE=str(pki / "node.crt"),
        TESSERA_TLS_KEY_FILE=str(pki / "node.key"), TESSERA_TLS_CA_FILE=str(pki / "ca.crt")))
    return first, second


def _processes_that_answered(nodes: tuple[NodeProcess, ...], method: str,
                             code: str = "OK") -> list[float]:
    return [handled(scrape(c["metrics_port"]), method, code)
            for node in nodes for c in serving(node)]


async def test_two_nodes_of_two_workers_on_external_servers_stay_correct(
    node_factory: NodeFactory, external_services: ExternalServices,
) -> None:
    a, b = _two_replicas(node_factory, external_services)
    for node in (a, b):  # neither embedded service runs, nor was ever set up
        children = set(_children_of(node))
        assert children == {"serving-0", "serving-1"}, children
        assert not NodePaths(node.data_dir).pgdata.exists()
        assert not NodePaths(node.data_dir).valkey.exists()
    creds = credentials(a)
    addresses = [a.address, b.address]

    # Writes through every process, each read back through the other node.
    for i in range(24):
        async with fresh_channel(addresses[i % 2], creds) as ch:
            op = await command_pb2_grpc.CommandServiceStub(ch).Execute(put_note(f"r{i}"),
                                                                       timeout=30)
            assert op.done and op.result.resource.id == f"r{i}"
    for i in range(24):
        async with fresh_channel(addresses[(i + 1) % 2], creds) as ch:
            got = await query_pb2_grpc.QueryServiceStub(ch).GetResource(get_note(f"r{i}"),
                                                                        timeout=30)
            assert got.resource.title == f"r{i}"
    wrote = _processes_that_answered((a, b), "Execute")
    read = _processes_that_answered((a, b), "GetResource")
    assert all(n > 0 for n in wrote) and sum(wrote) == 24, wrote
    assert all(n > 0 for n in read) and sum(read) == 24, read

    # Idempotency: one key sent to all four processes at once is one operation.
    async def send(i: int) -> command_pb2.Operation:
        async with fresh_channel(addresses[i % 2], creds) as ch:
            result: command_pb2.Operation = await command_pb2_grpc.CommandServiceStub(
                ch).Execute(put_note("once"), timeout=30)
            return result

    ops = await asyncio.gather(*(send(i) for i in range(16)))
    assert len({op.name for op in ops}) == 1
    assert len({op.result.resource.etag for op in ops}) == 1
    async with a.client() as c:
        stored = await c.query.GetResource(get_note("once"))
    assert stored.resource.etag == ops[0].result.resource.etag  # written once, not 16 times

    # The audit chain, written by four processes, verifies from either node and takes
    # in every call (effects' rows are linked into it within seconds).
    admin = credentials(a, "admin")
    for address in addresses:

        async def linked(address: str = address) -> bool:
            async with fresh_channel(address, admin) as ch:
                verdict = await admin_pb2_grpc.AdminServiceStub(ch).VerifyAudit(
                    admin_pb2.VerifyAuditRequest(), timeout=60)
            assert verdict.ok, verdict.message
            return verdict.checked >= 24 + 24 + 16

        await wait_until(linked, "every call's audit row in the verified chain",
                         timeout_s=60)


async def test_a_rate_limit_holds_across_two_nodes_of_two_workers(
    node_factory: NodeFactory, external_services: ExternalServices,
) -> None:
    # One identity, one Valkey: the node-wide burst of 10 reads is spent once, whichever
    # of the four processes each call reaches (a refill of one per 1000 s is negligible).
    # A generous decision timeout: on a loaded machine a 50 ms stall would send a call to
    # the local fallback, which is another test's subject.
    a, b = _two_replicas(node_factory, external_services,
                         TESSERA_RATELIMIT_LOCAL_LIMITS="read=0.001/10",
                         TESSERA_RATELIMIT_DECISION_TIMEOUT_MS="5000")
    async with a.client() as c:
        await c.command.Execute(put_note("limited"))
    creds = credentials(a)
    outcomes: list[grpc.StatusCode] = []
    for i in range(40):
        async with fresh_channel((a.address, b.address)[i % 2], creds) as ch:
            try:
                await query_pb2_grpc.QueryServiceStub(ch).GetResource(get_note("limited"),
                                                                      timeout=30)
                outcomes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                outcomes.append(exc.code())
    assert outcomes.count(grpc.StatusCode.OK) == 10
    assert outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 30
    tried = [ok + no for ok, no in zip(
        _processes_that_answered((a, b), "GetResource"),
        _processes_that_answered((a, b), "GetResource", "ResourceExhausted"), strict=True)]
    assert all(n > 0 for n in tried), tried


async def test_no_password_of_the_external_servers_in_logs_or_doctor(
    node_factory: NodeFactory, external_services: ExternalServices,
) -> None:
    a, b = _two_replicas(node_factory, external_services)
    secret = external_services.password
    async with fresh_channel(a.address, credentials(a, "admin")) as ch:
        checks = await admin_pb2_grpc.AdminServiceStub(ch).Doctor(admin_pb2.DoctorRequest(),
                                                                  timeout=60)
    rendered = str(checks)
    assert "postgres" in rendered.lower() and secret not in rendered
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "tessera.cli", "doctor", "--data-dir",
                         str(a.data_dir), "--json"],
        env=a.env, capture_output=True, timeout=120, check=False)
    out = (done.stdout + done.stderr).decode()
    assert "postgres" in out.lower() and secret not in out, out
    for node in (a, b):
        node.stop()
        assert secret not in node.log()


def _children_of(node: NodeProcess) -> list[str]:
    data = json.loads((node.data_dir / "run" / "supervisor.json").read_text())
    return list(data["children"])
