"""Traces across peers, JSON logs and metrics of real nodes, exported to a real receiver.

Three `tessera serve` processes; a fanned-out search on a is traced into the test's OTLP
receiver, and the one trace holds a's server span, a's client spans and b's and c's server
spans, each under the span that called it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import urllib.request
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest
from grpc_reflection.v1alpha.reflection_pb2 import ServerReflectionRequest
from grpc_reflection.v1alpha.reflection_pb2_grpc import ServerReflectionStub

from tessera_client.pb import query_pb2, resources_pb2
from tests.fixtures.calls import put
from tests.fixtures.nodes import NodeFactory, NodeProcess
from tests.fixtures.otlp import OtlpReceiver, ReceivedSpan
from tests.fixtures.peers import Peering
from tests.fixtures.pg import new_database
from tests.fixtures.valkey import free_port
from tests.fixtures.waiting import wait_until

ALL = resources_pb2.Sources(scope=resources_pb2.Sources.SCOPE_ALL)
SEARCH = "tessera.v1.QueryService/SearchResources"
SERVER, CLIENT = 2, 3  # OTLP Span.SpanKind values


def tracing_env(receiver: OtlpReceiver, **extra: str) -> dict[str, str]:
    """Environment of a node that traces everything into `receiver`, logging JSON."""
    return {"TESSERA_TRACING_ENDPOINT": receiver.endpoint, "TESSERA_TRACING_INSECURE": "true",
            "TESSERA_TRACING_EXPORT_DELAY_MS": "50", "TESSERA_LOG_FORMAT": "json", **extra}


def traceparent() -> tuple[str, str, str]:
    """A sampled W3C traceparent of the test's own (remote) span: header, trace, span id."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def json_lines(node: NodeProcess) -> list[dict[str, object]]:
    """Every line the node wrote, each parsed as one JSON object (fails on any other)."""
    out = []
    for n, line in enumerate(node.log().splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"line {n} of {node.log_path.name} is not JSON: {line!r}")
        assert isinstance(record, dict), line
        out.append(record)
    return out


async def access_line(node: NodeProcess, method: str, trace_id: str) -> dict[str, object]:
    """The node's log line for the call of `method` in trace `trace_id` (polled)."""
    for _ in range(100):
        for record in json_lines(node):
            if record.get("method") == f"/{method}" and record.get("trace_id") == trace_id:
                return record
        await asyncio.sleep(0.1)
    pytest.fail(f"no log line for {method} with trace id {trace_id}:\n{node.log()[-3000:]}")


async def test_a_fanned_out_search_is_one_trace_across_three_nodes(
    node_factory: NodeFactory, peering: Peering, otlp_receiver: OtlpReceiver
) -> None:
    mport = free_port()
    a = node_factory(name="a", env=tracing_env(
        otlp_receiver, TESSERA_METRICS_LISTEN_ADDRESS=f"127.0.0.1:{mport}"))
    b = node_factory(name="b", env=tracing_env(otlp_receiver))
    c = node_factory(name="c", env=tracing_env(otlp_receiver))
    for peer in (b, c):
        token = await peering.invite(peer, "a")
        await peering.grant(peer, "a", kinds=["note"], workspaces=["shared"])
        res = peering.join_cli(token, a)
        assert res.returncode == 0, res.stderr
    for node, rid in ((a, "na"), (b, "nb"), (c, "nc")):
        req = put("shared", "note", rid)
        req.put_resource.resource.embedding.extend([1.0, 0, 0, 0])
        async with node.client() as client:
            await client.command.Execute(req)

    header, trace_id, caller_span = traceparent()
    async with a.client() as client:
        resp = await client.query.SearchResources(
            query_pb2.SearchResourcesRequest(embedding=[1.0, 0, 0, 0], k=5, sources=ALL),
            metadata=(("traceparent", header),))
    assert {h.resource.source for h in resp.hits} == {"local", "b", "c"}

    def in_trace(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in spans if s.trace_id == trace_id]

    def complete(spans: list[ReceivedSpan]) -> bool:
        mine = in_trace(spans)
        servers = {s.node for s in mine if s.name == SEARCH and s.kind == SERVER}
        clients = [s for s in mine if s.node == "a" and s.name == SEARCH and s.kind == CLIENT]
        return servers == {"a", "b", "c"} and len(clients) == 2

    spans = in_trace(await otlp_receiver.wait_for(complete))
    server = {s.node: s for s in spans if s.name == SEARCH and s.kind == SERVER}
    root = server["a"]
    # a continued the test's trace: its server span's parent is the caller's span.
    assert root.parent_span_id == caller_span
    assert root.attributes["tessera.caller.kind"] == "client"
    assert root.attributes["rpc.grpc.status_code"] == 0
    assert root.attributes["tessera.audit.sequence"] > 0
    calls = {s.attributes["tessera.peer"]: s for s in spans if s.kind == CLIENT
             and s.name == SEARCH}
    assert set(calls) == {"b", "c"}
    for peer in ("b", "c"):
        assert calls[peer].parent_span_id == root.span_id
        # The peer continued a's client span: its server span is that span's child.
        assert server[peer].parent_span_id == calls[peer].span_id
        assert server[peer].attributes["tessera.caller.kind"] == "node"
        assert server[peer].attributes["tessera.caller.peer"] == "a"
        assert server[peer].attributes["tessera.audit.sequence"] > 0
        # The peer's own store work hangs under its server span.
        assert any(s.node == peer and s.name == "store search"
                   and s.parent_span_id == server[peer].span_id for s in spans)
    assert any(s.node == "a" and s.name == "store search" and s.parent_span_id == root.span_id
               for s in spans)

    # a's log line of the call carries the same trace id, and the audit sequence of its span.
    line = await access_line(a, SEARCH, trace_id)
    assert line["code"] == "OK" and line["identity"] == "spiffe://tessera.local/client/local"
    assert line["audit_sequence"] == root.attributes["tessera.audit.sequence"]
    assert line["request_id"] == root.attributes["tessera.request_id"]
    assert isinstance(line["duration_ms"], float)
    assert (await access_line(b, SEARCH, trace_id))["peer"] == "a"

    # The call's trace id is the exemplar of its counter (OpenMetrics exposition).
    req = urllib.request.Request(f"http://127.0.0.1:{mport}/metrics",
                                 headers={"Accept": "application/openmetrics-text"})
    text = await asyncio.to_thread(
        lambda: urllib.request.urlopen(req, timeout=5).read().decode())  # noqa: S310
    handled = [ln for ln in text.splitlines() if ln.startswith("grpc_server_handled_total{")
               and 'grpc_method="SearchResources"' in ln]
    assert handled and f'trace_id="{trace_id}"' in handled[0], handled


async def test_an_unsampled_node_is_not_forced_on_by_a_peers_sampled_flag(
    node_factory: NodeFactory, otlp_receiver: OtlpReceiver
) -> None:
    quiet = node_factory(name="quiet", env=tracing_env(
        otlp_receiver, TESSERA_TRACING_SAMPLE_RATIO="0"))
    trusting = node_factory(name="trusting", env=tracing_env(
        otlp_receiver, TESSERA_TRACING_SAMPLE_RATIO="0",
        TESSERA_TRACING_TRUST_REMOTE_PARENT="true"))
    ids = {}
    for name, node in (("quiet", quiet), ("trusting", trusting)):
        header, ids[name], _ = traceparent()
        async with node.client() as client:
            await client.query.Describe(query_pb2.DescribeRequest(),
                                        metadata=(("traceparent", header),))
    # The trusting node follows the sampled flag and exports; the other one does not, but
    # still logs the caller's trace id so its line can be found.
    await otlp_receiver.wait_for(lambda spans: any(s.trace_id == ids["trusting"]
                                                   for s in spans))
    await access_line(quiet, "tessera.v1.QueryService/Describe", ids["quiet"])
    assert quiet.stop() == 0  # a stop exports whatever spans are still buffered
    assert {s.node for s in otlp_receiver.spans} == {"trusting"}

    # A streaming call (reflection is bidi) gets its server span too.
    header, streamed, _ = traceparent()
    async with trusting.client() as client:
        call = ServerReflectionStub(client.channel).ServerReflectionInfo(
            iter([ServerReflectionRequest(list_services="")]),
            metadata=(("traceparent", header),))
        answers = [r async for r in call]
        assert answers and answers[0].list_services_response.service
    reflection = "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    await otlp_receiver.wait_for(lambda spans: any(
        s.trace_id == streamed and s.name == reflection and s.kind == SERVER for s in spans))


async def test_json_logs_parse_line_by_line_and_carry_no_secret(
    node_factory: NodeFactory, pg_server: str
) -> None:
    password = f"pw-{secrets.token_hex(8)}"
    # Trust authentication ignores the password, so the node starts with it in its DSN.
    parts = urlsplit(new_database(pg_server))
    user, _, host = parts.netloc.rpartition("@")
    dsn = urlunsplit((parts.scheme, f"{user or 'postgres'}:{password}@{host}", parts.path,
                      parts.query, parts.fragment))
    # DEBUG: the libraries' chattiest lines are checked too.
    node = node_factory(name="logs", env={"TESSERA_LOG_FORMAT": "json",
                                          "TESSERA_STORE_DSN": dsn},
                        options=["--log-level", "DEBUG"])
    header, trace_id, _ = traceparent()
    async with node.client() as client:
        await client.command.Execute(put("ws", "note", "n1"),
                                     metadata=(("traceparent", header),))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.query.GetResource(query_pb2.GetResourceRequest(
                key=resources_pb2.ResourceKey(workspace="ws", kind="note", id="missing")))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    line = await access_line(node, "tessera.v1.CommandService/Execute", trace_id)
    assert line["level"] == "INFO" and line["logger"] == "tessera.access"
    assert str(line["request_id"]) and line["code"] == "OK"
    # Access lines are written in batches (within ACCESS_FLUSH_S): poll for this one too.
    denied = await wait_until(lambda: [
        r for r in json_lines(node) if r.get("method") == "/tessera.v1.QueryService/GetResource"],
        "the access line of the refused GetResource")
    assert denied[0]["code"] == "NOT_FOUND"
    node.stop()
    records = json_lines(node)  # the shutdown lines too
    assert any(r["message"] == "tessera: stopped" for r in records)
    assert any(r["level"] == "DEBUG" for r in records)
    assert password not in node.log()
