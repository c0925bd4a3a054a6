"""The real grpcurl binary (Go gRPC, reflection v1alpha) against a node process over mTLS."""

from __future__ import annotations

import json
import shlex
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.nodes import NodeProcess
from tests.interop._support import describe, make_foreign_client, run, tls_probe

TESSERA_SERVICES = {
    "tessera.v1.AdminService",
    "tessera.v1.CommandService",
    "tessera.v1.EventService",
    "tessera.v1.QueryService",
}
#: grpcurl exits with 64 + the gRPC status code when an RPC fails.
GRPCURL_STATUS_EXIT_BASE = 64
INVALID_ARGUMENT = 3
#: A refused handshake makes grpcurl retry until its connect timeout; keep that short.
REFUSED_CONNECT_TIMEOUT = "3"


def grpcurl_run(grpcurl: Path, node: NodeProcess, *args: str, who: str = "admin",
                data: Any = None) -> subprocess.CompletedProcess[str]:
    """grpcurl with the node's CA and the `who` identity's certificate, against the node."""
    pki = node.pki
    argv = [str(grpcurl), "-connect-timeout", "10", "-max-time", "30", "-format-error",
            "-cacert", str(pki / "ca.crt"),
            "-cert", str(pki / f"{who}.crt"), "-key", str(pki / f"{who}.key")]
    if data is not None:
        argv += ["-d", json.dumps(data)]
    return run([*argv, node.address, *args])


def ok_json(proc: subprocess.CompletedProcess[str]) -> Any:
    """The JSON a successful grpcurl call printed."""
    assert proc.returncode == 0, describe(proc)
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"grpcurl did not print JSON\n{describe(proc)}") from None


def test_reflection_lists_the_four_tessera_services(grpcurl: Path, node: NodeProcess) -> None:
    proc = grpcurl_run(grpcurl, node, "list")
    assert proc.returncode == 0, describe(proc)
    listed = set(proc.stdout.split())
    assert {s for s in listed if s.startswith("tessera.")} == TESSERA_SERVICES, describe(proc)
    assert {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed, (
        describe(proc))

    proc = grpcurl_run(grpcurl, node, "list", "tessera.v1.CommandService")
    assert proc.returncode == 0, describe(proc)
    assert "tessera.v1.CommandService.Execute" in proc.stdout.split(), describe(proc)


def test_reflection_describes_a_service_method_and_its_messages(
    grpcurl: Path, node: NodeProcess
) -> None:
    # The method is described through its service: `describe tessera.v1.CommandService.Execute`
    # (a method symbol) answers "Symbol not found", because grpcio-reflection resolves symbols
    # with the upb pool's FindFileContainingSymbol, which knows services but not methods
    # (grpc/grpc#34743).
    proc = grpcurl_run(grpcurl, node, "describe", "tessera.v1.CommandService")
    assert proc.returncode == 0, describe(proc)
    assert "tessera.v1.CommandService is a service:" in proc.stdout, describe(proc)
    assert ("rpc Execute ( .tessera.v1.ExecuteRequest ) returns ( .tessera.v1.Operation );"
            in proc.stdout), describe(proc)

    proc = grpcurl_run(grpcurl, node, "describe", "tessera.v1.ExecuteRequest")
    assert proc.returncode == 0, describe(proc)
    assert "tessera.v1.ExecuteRequest is a message:" in proc.stdout, describe(proc)
    for line in ("string idempotency_key = 1;", "oneof command {",
                 ".tessera.v1.PutResourceCommand put_resource = 2;"):
        assert line in proc.stdout, describe(proc)

    # Messages from imported files resolve too (google/rpc/status.proto via command.proto).
    proc = grpcurl_run(grpcurl, node, "describe", "google.rpc.Status")
    assert proc.returncode == 0, describe(proc)
    assert "repeated .google.protobuf.Any details = 3;" in proc.stdout, describe(proc)


def test_health_check_is_serving(grpcurl: Path, node: NodeProcess) -> None:
    for service in ("", "tessera.v1.QueryService"):
        body = ok_json(grpcurl_run(grpcurl, node, "grpc.health.v1.Health/Check",
                                   data={"service": service}))
        assert body == {"status": "SERVING"}, f"service {service!r}: {body}"


def test_execute_put_then_get_resource_with_json(grpcurl: Path, node: NodeProcess) -> None:
    resource = {
        "workspace": "acme", "kind": "task", "id": "curl-1", "title": "Made by grpcurl",
        "body": "JSON in, protobuf on the wire", "attributes": {"priority": 2, "tags": ["a"]},
        "embedding": [0.5, -0.25, 1.0, 0.0], "owner": "ann", "team": "core",
    }
    op = ok_json(grpcurl_run(
        grpcurl, node, "tessera.v1.CommandService/Execute", who="client",
        data={"idempotency_key": "grpcurl-put-1", "put_resource": {"resource": resource}}))
    assert op["state"] == "OPERATION_STATE_SUCCEEDED" and op["done"] is True, op
    assert op["command_type"] == "resource.put", op
    assert op["name"].startswith("operations/"), op
    assert op["caller"].startswith("spiffe://tessera.local/client/"), op
    written = op["result"]["resource"]
    assert (written["version"], written["etag"]) == ("1", "v1"), op  # int64 is a JSON string

    got = ok_json(grpcurl_run(
        grpcurl, node, "tessera.v1.QueryService/GetResource", who="client",
        data={"key": {"workspace": "acme", "kind": "task", "id": "curl-1"}}))["resource"]
    for name in ("workspace", "kind", "id", "title", "body", "attributes", "owner", "team"):
        assert got.get(name) == resource[name], f"{name}: {got}"
    assert got["embedding"] == pytest.approx(resource["embedding"]), got
    assert (got["version"], got["etag"], got["source"]) == ("1", "v1", "local"), got
    assert got["create_time"].endswith("Z") and got["update_time"] == got["create_time"], got


@pytest.mark.parametrize(("method", "data", "field"), [
    ("tessera.v1.QueryService/GetResource",
     {"key": {"workspace": "", "kind": "task", "id": "x"}}, "key.workspace"),
    ("tessera.v1.CommandService/Execute",
     {"put_resource": {"resource": {"workspace": "w", "kind": "task", "id": "x"}}},
     "idempotency_key"),
], ids=["GetResource-no-workspace", "Execute-no-idempotency-key"])
def test_bad_request_is_invalid_argument_with_bad_request_details(
    grpcurl: Path, node: NodeProcess, method: str, data: Any, field: str
) -> None:
    proc = grpcurl_run(grpcurl, node, method, who="client", data=data)
    assert proc.returncode == GRPCURL_STATUS_EXIT_BASE + INVALID_ARGUMENT, describe(proc)
    try:
        status = json.loads(proc.stderr)  # -format-error prints the google.rpc.Status as JSON
    except ValueError:
        raise AssertionError(f"no JSON status on stderr\n{describe(proc)}") from None
    assert status["code"] == INVALID_ARGUMENT, describe(proc)
    violations = [v["field"] for d in status.get("details", [])
                  if d.get("@type") == "type.googleapis.com/google.rpc.BadRequest"
                  for v in d.get("field_violations", [])]
    assert violations == [field], describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)


def grpcurl_refused(grpcurl: Path, node: NodeProcess, *tls_args: str) -> None:
    """grpcurl with the node's CA and `tls_args` cannot even list services."""
    proc = run([str(grpcurl), "-connect-timeout", REFUSED_CONNECT_TIMEOUT, "-max-time", "30",
                "-cacert", str(node.pki / "ca.crt"), *tls_args, node.address, "list"])
    assert proc.returncode != 0, describe(proc)
    assert "tessera.v1" not in proc.stdout, describe(proc)
    assert "Failed to dial target host" in proc.stderr, describe(proc)


def test_grpcurl_without_a_client_certificate_is_refused(
    grpcurl: Path, node: NodeProcess
) -> None:
    grpcurl_refused(grpcurl, node)


def test_raw_tls_without_a_client_certificate_fails(node: NodeProcess) -> None:
    # Control: the same probe with the client certificate gets the server's HTTP/2 SETTINGS.
    good = tls_probe(node.address, node.pki / "ca.crt", node.pki / "client.crt",
                     node.pki / "client.key")
    assert isinstance(good, bytes) and len(good) >= 9 and good[3] == 0x4, (
        f"a TLS client with the client certificate should get a SETTINGS frame, got {good!r}")

    bad = tls_probe(node.address, node.pki / "ca.crt")
    # With TLS 1.3 the client's handshake can finish before the server checks the client's
    # (absent) certificate, so the refusal may surface on the first read instead.
    assert isinstance(bad, ssl.SSLError | ConnectionError) or bad == b"", (
        f"a TLS client without a certificate got {bad!r}")


def test_client_certificate_from_another_ca_is_refused(
    grpcurl: Path, node: NodeProcess, tmp_path: Path
) -> None:
    foreign = make_foreign_client(tmp_path / "foreign")
    grpcurl_refused(grpcurl, node, "-cert", str(foreign.cert), "-key", str(foreign.key))

    raw = tls_probe(node.address, node.pki / "ca.crt", foreign.cert, foreign.key)
    assert isinstance(raw, ssl.SSLError | ConnectionError) or raw == b"", (
        f"a TLS client with a foreign CA's certificate got {raw!r}")


def test_the_printed_grpcurl_command_works_as_printed(grpcurl: Path, node: NodeProcess) -> None:
    lines = node.log().splitlines()
    marker = [i for i, line in enumerate(lines) if line.strip().endswith("try it:")]
    assert marker and marker[-1] + 1 < len(lines), f"no 'try it:' line in the log:\n{node.log()}"
    printed = lines[marker[-1] + 1].strip()
    argv = shlex.split(printed)
    assert argv[0] == "grpcurl", f"the printed command does not start with grpcurl: {printed}"
    proc = run([str(grpcurl), *argv[1:]])
    assert proc.returncode == 0, f"printed: {printed}\n{describe(proc)}"
    listed = set(proc.stdout.split())
    assert TESSERA_SERVICES <= listed, f"printed: {printed}\n{describe(proc)}"
    assert node.address in argv, f"the printed command does not target {node.address}: {printed}"
