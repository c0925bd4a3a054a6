"""The foundation slice against real node processes, PostgreSQL + pgvector and Valkey."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from pathlib import Path

import grpc
import psycopg
import pytest
from cryptography import x509
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tessera.embedded import SOCKET_PATH_MAX, valkey_socket
from tessera_client import AsyncClient
from tessera_client.pb import (
    admin_pb2,
    command_pb2,
    query_pb2,
)
from tests.fixtures.calls import bad_fields, dev_ca_credentials, key, put, reason_of, run_cli
from tests.fixtures.nodes import TEST_DIMENSION, NodeFactory, NodeProcess
from tests.fixtures.waiting import wait_until


async def test_put_get_list_delete_through_generated_stubs(node: NodeProcess) -> None:
    emb = [0.5, -0.25, 1.0, 0.0]
    async with node.client() as c:
        op = await c.command.Execute(put("acme", "task", "t1", "k-put", title="Write tests",
                                         body="real components", embedding=emb, owner="ann",
                                         team="core"))
        assert op.done and op.state == command_pb2.OPERATION_STATE_SUCCEEDED
        assert op.result.resource.version == 1 and op.result.resource.etag == "v1"

        got = (await c.query.GetResource(query_pb2.GetResourceRequest(
            key=key("acme", "task", "t1")))).resource
        assert (got.title, got.body, got.owner, got.team) == (
            "Write tests", "real components", "ann", "core")
        assert list(got.embedding) == pytest.approx(emb)
        assert got.source == "local"

        listed = await c.query.ListResources(query_pb2.ListResourcesRequest(
            workspace="acme", kind="task"))
        assert [r.id for r in listed.resources] == ["t1"]

        op = await c.command.Execute(command_pb2.ExecuteRequest(
            idempotency_key="k-del",
            delete_resource=command_pb2.DeleteResourceCommand(key=key("acme", "task", "t1"))))
        assert op.state == command_pb2.OPERATION_STATE_SUCCEEDED
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.query.GetResource(query_pb2.GetResourceRequest(key=key("acme", "task", "t1")))
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND


async def test_idempotent_replay_returns_same_operation_and_applies_once(
    node: NodeProcess,
) -> None:
    async with node.client() as c:
        first = await c.command.Execute(put("acme", "note", "n1", "same-key", title="once"))
        again = await c.command.Execute(put("acme", "note", "n1", "same-key", title="once"))
        assert again.name == first.name
        got = await c.query.GetResource(query_pb2.GetResourceRequest(key=key("acme", "note", "n1")))
        assert got.resource.version == 1, "a replay must not apply the command again"

        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.command.Execute(put("acme", "note", "n1", "same-key", title="different"))
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason_of(exc.value) == "IDEMPOTENCY_KEY_REUSED"

        fetched = await c.command.GetOperation(command_pb2.GetOperationRequest(name=first.name))
        assert fetched.name == first.name and fetched.done


async def test_etag_guards_concurrent_updates(node: NodeProcess) -> None:
    async with node.client() as c:
        await c.command.Execute(put("acme", "task", "e1", "e-1", title="v1"))
        req = put("acme", "task", "e1", "e-2", title="v2")
        req.put_resource.expected_etag = "v1"
        op = await c.command.Execute(req)
        assert op.result.resource.version == 2
        stale = put("acme", "task", "e1", "e-3", title="lost update")
        stale.put_resource.expected_etag = "v1"
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.command.Execute(stale)
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason_of(exc.value) == "ETAG_MISMATCH"


async def test_every_write_appends_its_event_in_the_same_transaction(
    node: NodeProcess,
) -> None:
    async with node.client() as c:
        ops = [await c.command.Execute(put("w", "task", f"ev{i}", f"ev-{i}")) for i in range(3)]
        ops.append(await c.command.Execute(command_pb2.ExecuteRequest(
            idempotency_key="ev-del",
            delete_resource=command_pb2.DeleteResourceCommand(key=key("w", "task", "ev0")))))
    with psycopg.connect(node.env["TESSERA_STORE_DSN"]) as conn:
        rows = conn.execute(
            "SELECT sequence, type, resource_id FROM events ORDER BY sequence"
        ).fetchall()
    assert [(r[1], r[2]) for r in rows] == [
        ("task.put", "ev0"), ("task.put", "ev1"), ("task.put", "ev2"), ("task.delete", "ev0")]
    assert [op.event_sequence for op in ops] == [r[0] for r in rows]


async def test_list_pages_are_stable_and_complete(node: NodeProcess) -> None:
    async with node.client() as c:
        for i in range(23):
            await c.command.Execute(put("pg", "memory", f"m{i:02d}", f"p-{i}"))
        await c.command.Execute(put("other", "memory", "x", "p-other"))
        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            resp = await c.query.ListResources(query_pb2.ListResourcesRequest(
                workspace="pg", page_size=10, page_token=token))
            seen += [r.id for r in resp.resources]
            pages += 1
            token = resp.next_page_token
            if not token:
                break
        assert pages == 3
        assert seen == [f"m{i:02d}" for i in range(23)]


async def test_page_token_cannot_be_replayed_with_other_filters_or_forged(
    node: NodeProcess,
) -> None:
    async with node.client() as c:
        for i in range(3):
            await c.command.Execute(put("tok", "task", f"t{i}", f"tok-{i}"))
        resp = await c.query.ListResources(query_pb2.ListResourcesRequest(
            workspace="tok", page_size=1))
        token = resp.next_page_token
        assert token
        for bad in (
            query_pb2.ListResourcesRequest(workspace="other", page_size=1, page_token=token),
            query_pb2.ListResourcesRequest(workspace="tok", page_size=1, page_token=token + "x"),
            query_pb2.ListResourcesRequest(workspace="tok", page_size=1, page_token="garbage"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await c.query.ListResources(bad)
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert bad_fields(exc.value) == ["page_token"]
    # Another caller (the admin identity) cannot use the client's token either.
    async with node.client("admin") as admin:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await admin.query.ListResources(query_pb2.ListResourcesRequest(
                workspace="tok", page_size=1, page_token=token))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


BAD_INPUTS = [
    ("GetResource", query_pb2.GetResourceRequest(), ["key"]),
    ("GetResource", query_pb2.GetResourceRequest(key=key("", "task", "x")), ["key.workspace"]),
    ("GetResource", query_pb2.GetResourceRequest(key=key("w", "spaceship", "x")), ["key.kind"]),
    ("GetResource", query_pb2.GetResourceRequest(key=key("w", "task", "bad id!")), ["key.id"]),
    ("ListResources", query_pb2.ListResourcesRequest(page_size=-1), ["page_size"]),
    ("ListResources", query_pb2.ListResourcesRequest(page_size=5000), ["page_size"]),
    ("ListResources", query_pb2.ListResourcesRequest(kind="nope"), ["kind"]),
    ("ListResources", query_pb2.ListResourcesRequest(page_token="!!"), ["page_token"]),
    ("ListResources", query_pb2.ListResourcesRequest(
        updated_since=timestamp_pb2.Timestamp(seconds=2**62)), ["updated_since"]),
    ("Execute", command_pb2.ExecuteRequest(idempotency_key="k"), ["command"]),
    ("Execute", put("w", "task", "x", ""), ["idempotency_key"]),
    ("Execute", put("w", "task", "x", "k", title="t" * 1001), ["put_resource.resource.title"]),
    ("Execute", put("w", "task", "x", "k", body="b" * ((1 << 20) + 1)),
     ["put_resource.resource.body"]),
    ("Execute", put("w", "task", "x", "k", embedding=[1.0] * (TEST_DIMENSION + 1)),
     ["put_resource.resource.embedding"]),
    ("Execute", put("w", "task", "x", "k", embedding=[math.nan] * TEST_DIMENSION),
     ["put_resource.resource.embedding"]),
    ("Execute", put("w", "kind-unknown", "x", "k"), ["put_resource.resource.kind"]),
    ("GetOperation", command_pb2.GetOperationRequest(), ["name"]),
]


@pytest.mark.parametrize(("method", "request_msg", "fields"), BAD_INPUTS,
                         ids=[f"{m}-{'+'.join(f)}" for m, _, f in BAD_INPUTS])
async def test_bad_input_answers_invalid_argument_naming_the_field(
    node: NodeProcess, method: str, request_msg: object, fields: list[str]
) -> None:
    async with node.client() as c:
        stub = c.command if method in ("Execute", "GetOperation") else c.query
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await getattr(stub, method)(request_msg)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_fields(exc.value) == fields
        assert "Traceback" not in (exc.value.details() or "")


async def test_admin_rpcs_need_an_admin_identity(node: NodeProcess) -> None:
    async with node.client("client") as c:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.admin.GetNodeInfo(admin_pb2.GetNodeInfoRequest())
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert reason_of(exc.value) == "ADMIN_REQUIRED"
    async with node.client("admin") as a:
        info = await a.admin.GetNodeInfo(admin_pb2.GetNodeInfoRequest())
        assert info.identity.uri == "spiffe://tessera.local/node/tessera"
        assert info.embedding_dimension == TEST_DIMENSION and info.schema_version >= 1


async def test_an_unregistered_command_type_names_the_field(node: NodeProcess) -> None:
    async with node.client() as c:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.command.Execute(command_pb2.ExecuteRequest(
                idempotency_key="p1", plugin=command_pb2.PluginCommand(type="task.assign")))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_fields(exc.value) == ["plugin.type"]
        assert "task.assign" in (exc.value.details() or "")




@pytest.mark.parametrize("uris", [
    [],
    ["spiffe://tessera.local/client/a", "spiffe://tessera.local/client/b"],
    ["https://tessera.local/client/a"],
    ["spiffe://tessera.local/robot/a"],
    ["spiffe://elsewhere.example/client/a"],
], ids=["no-uri-san", "two-uri-sans", "not-spiffe", "unknown-kind", "foreign-trust-domain"])
async def test_certificate_without_exactly_one_valid_identity_is_unauthenticated(
    node: NodeProcess, uris: list[str], tmp_path: Path
) -> None:
    creds = dev_ca_credentials(node, uris)
    async with AsyncClient(node.address, creds) as c:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.query.Describe(query_pb2.DescribeRequest())
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_sigterm_turns_health_not_serving_and_exits_cleanly(node: NodeProcess) -> None:
    async with node.client() as c:
        health = health_pb2_grpc.HealthStub(c.channel)
        resp = await health.Check(health_pb2.HealthCheckRequest(service="tessera.v1.QueryService"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert node.stop() == 0
    assert "tessera: stopped" in node.log()


async def test_embedded_default_keeps_data_and_certificates_across_restarts(
    node_factory: NodeFactory,
) -> None:
    node = node_factory(embedded=True)
    cert_before = (node.pki / "node.crt").read_bytes()
    admin_before = (node.pki / "admin.crt").read_bytes()
    for path in ("node.key", "admin.key", "client.key", "dev-ca/root.key"):
        assert (node.pki / path).stat().st_mode & 0o777 == 0o600, path
    async with node.client() as c:
        await c.command.Execute(put("home", "note", "keep", "keep-1", title="still here"))
    node.restart()
    assert (node.pki / "node.crt").read_bytes() == cert_before
    assert (node.pki / "admin.crt").read_bytes() == admin_before
    async with node.client() as c:
        got = await c.query.GetResource(query_pb2.GetResourceRequest(
            key=key("home", "note", "keep")))
        assert got.resource.title == "still here"
    assert node.stop() == 0




async def test_a_data_directory_too_deep_for_a_socket_path_runs_embedded_valkey(
    node_factory: NodeFactory, tmp_path: Path,
) -> None:
    """Valkey cannot bind `<data>/valkey/valkey.sock` past 107 bytes (it exited 1 and the
    node did not start); its socket then lives in a private directory under /tmp, recorded
    in the data directory for restarts and `doctor`."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    assert len(os.fsencode(deep / "valkey" / "valkey.sock")) > SOCKET_PATH_MAX
    node = node_factory(embedded=True, data_dir=deep)
    sock = valkey_socket(deep / "valkey")
    assert sock is not None and sock.exists() and not sock.is_relative_to(deep), sock
    st = sock.parent.lstat()
    assert st.st_uid == os.geteuid() and st.st_mode & 0o777 == 0o700, sock
    async with node.client() as c:
        await c.command.Execute(put("home", "note", "deep", "deep-1", title="deep"))
    res = run_cli(None, "doctor", "--json", "--data-dir", str(deep), env=node.env)
    statuses = {c["name"]: c["status"] for c in json.loads(res.stdout)["checks"]}
    assert statuses["valkey"] == "green", res.stdout
    node.restart()  # the same socket path again, found by the hash of the directory
    assert valkey_socket(deep / "valkey") == sock and sock.exists()
    async with node.client() as c:
        got = await c.query.GetResource(query_pb2.GetResourceRequest(
            key=key("home", "note", "deep")))
        assert got.resource.title == "deep"
    assert node.stop() == 0


def test_wrong_setting_stops_the_start_with_one_line_naming_it(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "TESSERA_STORE_METRIC": "manhattan"}
    res = run_cli(None, "serve", "--data-dir", str(tmp_path / "d"), env=env)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "store.metric" in lines[0], res.stderr


async def test_doctor_reports_green_for_a_running_node_without_credentials(
    node: NodeProcess,
) -> None:
    res = run_cli(None, "doctor", "--json", "--data-dir", str(node.data_dir), env=node.env)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses["postgresql"] == statuses["pgvector"] == statuses["valkey"] == "green"
    assert statuses["certificate"] == "green"


def test_doctor_is_red_and_redacts_the_password_when_postgres_is_unreachable(
    tmp_path: Path,
) -> None:
    import os

    env = {**os.environ, "TESSERA_STORE_DSN": "postgresql://tess:s3cr3t-pw@127.0.0.1:1/db",
           "TESSERA_VALKEY_URL": "redis://:vk-s3cr3t@127.0.0.1:1/0"}
    res = run_cli(None, "doctor", "--json", "--data-dir", str(tmp_path), env=env)
    assert res.returncode == 1
    report = json.loads(res.stdout)
    assert report["status"] == "red"
    assert "s3cr3t" not in res.stdout + res.stderr


async def test_a_certificate_that_expires_on_an_open_connection_is_refused(
    node: NodeProcess, tmp_path: Path
) -> None:
    creds = dev_ca_credentials(node, ["spiffe://tessera.local/client/brief"],
                               lifetime=dt.timedelta(seconds=3))
    not_after = x509.load_pem_x509_certificate(creds.cert_pem).not_valid_after_utc
    async with AsyncClient(node.address, creds) as c:
        await c.query.Describe(query_pb2.DescribeRequest())
        await wait_until(lambda: dt.datetime.now(dt.UTC) > not_after,
                         "the client certificate has expired")
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.query.Describe(query_pb2.DescribeRequest())
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert reason_of(exc.value) == "CERT_EXPIRED"


async def test_reflection_refuses_a_foreign_trust_domain_too(
    node: NodeProcess, tmp_path: Path
) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    creds = dev_ca_credentials(node, ["spiffe://elsewhere.example/client/a"])
    async with AsyncClient(node.address, creds) as c:
        stub = reflection_pb2_grpc.ServerReflectionStub(c.channel)
        call = stub.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services="")]))
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for _ in call:
                pass
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_admin_rpcs_answer_out_of_range_times_with_invalid_argument(
    node: NodeProcess,
) -> None:
    from google.protobuf import duration_pb2

    async with node.client("admin") as a:
        for call, req, field in (
            (a.admin.InvitePeer, admin_pb2.InvitePeerRequest(
                name="p1", token_ttl=duration_pb2.Duration(seconds=2**62)), "token_ttl"),
            (a.admin.ListAuditRecords, admin_pb2.ListAuditRecordsRequest(
                start_time=timestamp_pb2.Timestamp(seconds=2**62)), "start_time"),
            (a.admin.ListAuditRecords, admin_pb2.ListAuditRecordsRequest(
                start_time=timestamp_pb2.Timestamp(seconds=2000),
                end_time=timestamp_pb2.Timestamp(seconds=1000)), "end_time"),
            (a.admin.GetRateLimitStatus, admin_pb2.GetRateLimitStatusRequest(subject="foo"),
             "subject"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await call(req)
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
            assert bad_fields(exc.value) == [field]


async def test_a_start_that_fails_half_way_leaves_nothing_bound(
    tmp_path: Path, pg_dsn: str, valkey_url: str
) -> None:
    import socket

    from tessera import config
    from tessera.app import start_node
    from tessera.core.errors import ConfigError

    def free() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    listen = free()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = config.load(None, environ={}, overrides={
            "node.data_dir": str(tmp_path / "d"), "node.listen_address": f"127.0.0.1:{listen}",
            "node.enroll_listen_address": f"127.0.0.1:{taken.getsockname()[1]}",
            "store.dsn": pg_dsn, "valkey.url": valkey_url,
            "store.embedding_dimension": str(TEST_DIMENSION)})
        with pytest.raises(ConfigError, match=r"node\.enroll_listen_address"):
            await start_node(cfg)
    with socket.socket() as again:
        again.bind(("127.0.0.1", listen))  # the service port was released


async def test_serving_processes_run_the_configured_event_loop(
        node_factory: NodeFactory) -> None:
    """uvloop by default; the standard library's loop when `node.event_loop = "asyncio"`.
    Both serve the same calls (the whole suite runs on the default)."""
    for choice, uvloop_loaded in (("", True), ("asyncio", False)):
        env = {"TESSERA_NODE_EVENT_LOOP": choice} if choice else {}
        node = node_factory(name=f"loop-{choice or 'default'}", env=env)
        async with node.client() as c:
            op = await c.command.Execute(put("acme", "task", "loop", f"k-{choice}"))
            assert op.state == command_pb2.OPERATION_STATE_SUCCEEDED
            got = await c.query.GetResource(query_pb2.GetResourceRequest(
                key=key("acme", "task", "loop")))
            assert got.resource.id == "loop"
        for pid in node.serving_pids:
            assert ("uvloop" in _mapped_files(pid)) is uvloop_loaded, (choice, pid)
        node.stop()


def _mapped_files(pid: int) -> str:
    """The files a process has mapped (its loaded extension modules among them)."""
    return Path(f"/proc/{pid}/maps").read_text()
