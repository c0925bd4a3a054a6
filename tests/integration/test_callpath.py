"""The call path against a real node: bad bytes and bad values answer INVALID_ARGUMENT
naming the field and are audited; unknown methods UNIMPLEMENTED; a stopped PostgreSQL
gives UNAVAILABLE only, and the node recovers by itself."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from tessera.embedded import EmbeddedPostgres
from tessera_client.pb import admin_pb2, command_pb2, events_pb2, query_pb2, resources_pb2
from tests.fixtures.calls import run_cli
from tests.fixtures.nodes import NodeFactory, NodeProcess
from tests.fixtures.pg import new_database
from tests.fixtures.valkey import free_port
from tests.fixtures.workers import scrape

CLIENT = "spiffe://tessera.local/client/local"
ADMIN = "spiffe://tessera.local/admin/admin"
SERVICES = [query_pb2.DESCRIPTOR.services_by_name["QueryService"],
            command_pb2.DESCRIPTOR.services_by_name["CommandService"],
            events_pb2.DESCRIPTOR.services_by_name["EventService"],
            admin_pb2.DESCRIPTOR.services_by_name["AdminService"]]
ADMIN_SERVICE = "tessera.v1.AdminService"


def every_method(field_1_text: bool = False) -> Iterator[tuple[str, bool, str]]:
    """(path, server-streaming, who may call it) of every method of the node's API; only
    those whose request's field 1 holds UTF-8 text (a string or a message) if asked."""
    for svc in SERVICES:
        who = "admin" if svc.full_name == ADMIN_SERVICE else "client"
        for m in svc.methods:
            if m.name in PEERS_ONLY:
                continue  # admission refuses a local identity before the request is read
            f1 = m.input_type.fields_by_number.get(1)
            if field_1_text and (f1 is None or f1.type not in (f1.TYPE_STRING,
                                                               f1.TYPE_MESSAGE)):
                continue
            yield f"/{svc.full_name}/{m.name}", m.server_streaming, who


#: Methods only a peer may call (renewing the certificate it holds for this node).
PEERS_ONLY = frozenset({"RenewPeerCertificate"})


async def raw_call(node: NodeProcess, who: str, path: str, body: bytes,
                   streaming: bool = False) -> grpc.StatusCode:
    """Send `body` as the request bytes of `path`; the status code it ends with."""
    async with node.client(who) as c:
        try:
            if streaming:
                call = c.channel.unary_stream(path)(body, timeout=60)
                async for _ in call:
                    pass
            else:
                await c.channel.unary_unary(path)(body, timeout=60)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def violations(exc: grpc.aio.AioRpcError) -> list[str]:
    """The fields a BadRequest detail names."""
    status = rpc_status.from_call(exc)
    assert status is not None
    fields = []
    for detail in status.details:
        br = error_details_pb2.BadRequest()
        if detail.Unpack(br):
            fields += [v.field for v in br.field_violations]
    return fields


def audit_rows(node: NodeProcess, method: str) -> list[tuple[str, str]]:
    with psycopg.connect(node.env["TESSERA_STORE_DSN"], autocommit=True) as conn:
        return [(r[0], r[1]) for r in conn.execute(
            "SELECT identity, status_code FROM audit_log WHERE method = %s ORDER BY sequence",
            (method,)).fetchall()]




async def test_undecodable_bytes_answer_invalid_argument_on_every_method_and_are_audited(
    node: NodeProcess,
) -> None:
    assert len(list(every_method())) >= 26
    # 0xff is a truncated field tag (every method); the second is field 1, length 2, with
    # bytes that are not UTF-8 (for each method whose field 1 is a string or a message).
    for body, methods in ((b"\xff", every_method()), (b"\x0a\x02\xff\xfe", every_method(True))):
        got = {path: await raw_call(node, who, path, body, streaming)
               for path, streaming, who in methods}
        assert len(got) >= 20
        assert set(got.values()) == {grpc.StatusCode.INVALID_ARGUMENT}, got
    assert ("spiffe://tessera.local/client/local", "INVALID_ARGUMENT") in audit_rows(
        node, "ListResources")
    for name in PEERS_ONLY:
        assert await raw_call(node, "admin", f"/{ADMIN_SERVICE}/{name}", b"\xff") \
            == grpc.StatusCode.PERMISSION_DENIED
    assert audit_rows(node, "SuspendPeer") == [(ADMIN, "INVALID_ARGUMENT")] * 2


async def test_an_unknown_method_answers_unimplemented_and_is_audited(node: NodeProcess) -> None:
    for path in ("/tessera.v1.QueryService/NoSuchMethod", "/no.such.Service/Call"):
        assert await raw_call(node, "client", path, b"") == grpc.StatusCode.UNIMPLEMENTED
    assert audit_rows(node, "NoSuchMethod") == [(CLIENT, "UNIMPLEMENTED")]
    assert audit_rows(node, "Call") == [(CLIENT, "UNIMPLEMENTED")]


async def test_invented_method_paths_add_no_metric_series(node_factory: NodeFactory) -> None:
    port = free_port()
    node = node_factory(name="paths", env={"TESSERA_METRICS_LISTEN_ADDRESS": f"127.0.0.1:{port}"})
    for n in range(20):
        assert await raw_call(node, "client", f"/invented.S{n}/M{n}", b"") == \
            grpc.StatusCode.UNIMPLEMENTED
    async with node.client() as c:
        await c.query.ListResources(query_pb2.ListResourcesRequest(workspace="w"))
    samples = await asyncio.to_thread(scrape, port)
    handled = {dict(labels)["grpc_service"]: value for (name, labels), value in samples.items()
               if name == "grpc_server_handled_total"}
    assert handled.get("unknown") == 20 and not any("invented" in s for s in handled), handled
    assert handled.get("tessera.v1.QueryService") == 1  # served methods keep their names
    assert len(audit_rows(node, "M7")) == 1  # the audit row keeps the caller's path


def _put(**fields: object) -> command_pb2.ExecuteRequest:
    r = resources_pb2.Resource(workspace="w", kind="task", id="r1", **fields)  # type: ignore[arg-type]
    return command_pb2.ExecuteRequest(idempotency_key="k1",
                                      put_resource=command_pb2.PutResourceCommand(resource=r))


def _struct(key: str, value: struct_pb2.Value) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.fields[key].CopyFrom(value)
    return s


def _filter(value: struct_pb2.Value) -> list[query_pb2.AttributeFilter]:
    return [query_pb2.AttributeFilter(key="k", value=value)]


NUL = "a\x00b"
_S = struct_pb2.Value(string_value=NUL)
BAD_VALUES: list[tuple[str, str, Message, str]] = [
    # (who, method, request, the field the answer must name)
    ("client", "ListResources", query_pb2.ListResourcesRequest(team=NUL), "team"),
    ("client", "ListResources", query_pb2.ListResourcesRequest(owner=NUL), "owner"),
    ("client", "ListResources", query_pb2.ListResourcesRequest(attribute_filters=_filter(_S)),
     "attribute_filters[0].value"),
    ("client", "SearchResources", query_pb2.SearchResourcesRequest(text=NUL, k=3), "text"),
    ("client", "Execute", _put(title=NUL), "put_resource.resource.title"),
    ("client", "Execute", _put(body=NUL), "put_resource.resource.body"),
    ("client", "Execute", _put(owner=NUL), "put_resource.resource.owner"),
    ("client", "Execute", _put(team=NUL), "put_resource.resource.team"),
    ("client", "Execute", _put(attributes=_struct(NUL, struct_pb2.Value(bool_value=True))),
     "put_resource.resource.attributes.a\\x00b (key)"),
    ("client", "Execute", _put(attributes=_struct("k", _S)), "put_resource.resource.attributes.k"),
    ("admin", "SuspendPeer", admin_pb2.SuspendPeerRequest(name="p", reason=NUL), "reason"),
    ("admin", "ListAuditRecords", admin_pb2.ListAuditRecordsRequest(peer=NUL), "peer"),
    ("admin", "ListAuditRecords", admin_pb2.ListAuditRecordsRequest(grant=NUL), "grant"),
]
for _n in (math.nan, math.inf, -math.inf):
    _v = struct_pb2.Value(number_value=_n)
    BAD_VALUES += [
        ("client", "Execute", _put(attributes=_struct("n", _v)),
         "put_resource.resource.attributes.n"),
        ("client", "Execute", _put(attributes=_struct("deep", struct_pb2.Value(
            list_value=struct_pb2.ListValue(values=[struct_pb2.Value(number_value=1), _v])))),
         "put_resource.resource.attributes.deep[1]"),
        ("client", "ListResources", query_pb2.ListResourcesRequest(attribute_filters=_filter(_v)),
         "attribute_filters[0].value"),
        ("client", "SearchResources", query_pb2.SearchResourcesRequest(
            text="x", k=3, attribute_filters=_filter(_v)), "attribute_filters[0].value"),
        ("client", "SearchResources", query_pb2.SearchResourcesRequest(
            embedding=[0.1, _n, 0.2, 0.3], k=3), "embedding"),
        ("client", "SearchResources", query_pb2.SearchResourcesRequest(
            text="x", k=3, min_score=_n), "min_score"),
    ]
_SERVICE_OF = {m.name: svc.full_name for svc in SERVICES for m in svc.methods}


async def test_each_bad_value_class_answers_invalid_argument_naming_the_field(
    node: NodeProcess,
) -> None:
    for who, method, request, field in BAD_VALUES:
        async with node.client(who) as c:
            call = c.channel.unary_unary(f"/{_SERVICE_OF[method]}/{method}",
                                         request_serializer=type(request).SerializeToString)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await call(request, timeout=60)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, field)
        assert field in violations(exc.value), (method, field, exc.value.details())
    # Nothing was written, and the node still answers.
    async with node.client() as c:
        listed = await c.query.ListResources(query_pb2.ListResourcesRequest())
    assert list(listed.resources) == []


# -- PostgreSQL stopped under load ---------------------------------------------------------

ALLOWED_WHILE_DOWN = {grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE}


async def _health(node: NodeProcess, service: str) -> int:
    async with node.client() as c:
        stub = health_pb2_grpc.HealthStub(c.channel)
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
        return int(resp.status)


async def _poll(what: str, check: object, deadline_s: float = 90.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while not await check():  # type: ignore[operator]
        assert loop.time() < end, f"gave up waiting for: {what}"
        await asyncio.sleep(0.1)


async def test_postgres_stopped_under_load_gives_only_unavailable_and_recovers_by_itself(
    tmp_path: Path, node_factory: NodeFactory,
) -> None:
    pg = EmbeddedPostgres(tmp_path / "own-pg" / "data")
    server_dsn = await asyncio.to_thread(pg.start)
    try:
        dsn = new_database(server_dsn)
        node = node_factory(env={"TESSERA_STORE_DSN": dsn})
        codes: dict[grpc.StatusCode, int] = {}
        details: list[str] = []
        stop = asyncio.Event()

        async def worker(n: int) -> None:
            async with node.client() as c:
                i = 0
                while not stop.is_set():
                    i += 1
                    try:
                        if i % 2:
                            await c.command.Execute(_put_named(f"w{n}-{i}"), timeout=60)
                        else:
                            await c.query.GetResource(query_pb2.GetResourceRequest(
                                key=resources_pb2.ResourceKey(workspace="w", kind="task",
                                                              id=f"w{n}-{i - 1}")), timeout=60)
                        code = grpc.StatusCode.OK
                    except grpc.aio.AioRpcError as exc:
                        code = exc.code()
                        if code is grpc.StatusCode.UNAVAILABLE:
                            details.append(exc.details() or "")
                    codes[code] = codes.get(code, 0) + 1
                    await asyncio.sleep(0.01)

        workers = [asyncio.create_task(worker(n)) for n in range(8)]
        try:
            await _poll("some calls succeeding", lambda: _ok(codes))
            await asyncio.to_thread(pg.stop)
            serving = health_pb2.HealthCheckResponse.SERVING
            query = "tessera.v1.QueryService"

            async def down() -> bool:
                return await _health(node, query) != serving and \
                    codes.get(grpc.StatusCode.UNAVAILABLE, 0) > 20

            await _poll("health NOT_SERVING and calls UNAVAILABLE", down)
            async with node.client() as c:
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await c.query.Describe(query_pb2.DescribeRequest(), timeout=60)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "PostgreSQL" in (exc.value.details() or "")
            # doctor says why: the database is unreachable, and the node says it is down.
            report = await asyncio.to_thread(
                run_cli, node, "doctor", "--json")
            assert report.returncode == 1, report.stderr
            checks = {c["name"]: c for c in json.loads(report.stdout)["checks"]}
            assert checks["postgresql"]["status"] == "red"
            assert "PostgreSQL is down" in checks["node"]["message"]
            assert "password" not in report.stdout.lower()
            pg = EmbeddedPostgres(tmp_path / "own-pg" / "data")
            assert await asyncio.to_thread(pg.start) == server_dsn
            ok_before = codes.get(grpc.StatusCode.OK, 0)

            async def back() -> bool:
                return await _health(node, query) == serving and \
                    codes.get(grpc.StatusCode.OK, 0) > ok_before + 20

            await _poll("health SERVING and calls succeeding again", back)
        finally:
            stop.set()
            await asyncio.gather(*workers)
        assert set(codes) <= ALLOWED_WHILE_DOWN, codes
        assert all("dsn" not in d.lower() and "password" not in d.lower() for d in details)
        async with node.client("admin") as a:
            verdict = await a.admin.VerifyAudit(admin_pb2.VerifyAuditRequest(), timeout=60)
        assert verdict.ok, verdict.message
    finally:
        await asyncio.to_thread(pg.stop)


def _put_named(rid: str) -> command_pb2.ExecuteRequest:
    r = resources_pb2.Resource(workspace="w", kind="task", id=rid, title=rid)
    return command_pb2.ExecuteRequest(idempotency_key=rid,
                                      put_resource=command_pb2.PutResourceCommand(resource=r))


async def _ok(codes: dict[grpc.StatusCode, int]) -> bool:
    return codes.get(grpc.StatusCode.OK, 0) > 20
