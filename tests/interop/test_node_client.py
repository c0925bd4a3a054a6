"""A Node.js client (@grpc/grpc-js + @grpc/proto-loader) against a node process over mTLS.

The client (tests/interop/node/client.js) loads the .proto files from the repository at run
time, so this also checks that the published protos are self-contained for other stacks.
If node or npm is missing, or `npm install` fails, the test fails: it never skips.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import google.rpc.status_pb2
import pytest

from tests.fixtures.nodes import NodeProcess
from tests.interop._support import describe, run

NODE_DIR = Path(__file__).resolve().parent / "node"
PROTO_DIR = Path(__file__).resolve().parents[2] / "proto"
#: The directory holding google/rpc/status.proto (and error_details.proto): the Python
#: googleapis-common-protos package ships the .proto files next to the generated modules.
RPC_INCLUDE_DIR = Path(google.rpc.status_pb2.__file__).resolve().parents[2]
NPM_INSTALL_TIMEOUT_S = 300.0
CLIENT_TIMEOUT_S = 60.0
INVALID_ARGUMENT = 3


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, (f"`{name}` is not on PATH; the Node.js interop test needs Node.js >= 18 "
                  "and npm (it does not skip)")
    return path


def _deps_resolve(node: str) -> subprocess.CompletedProcess[str]:
    script = ("for (const m of ['@grpc/grpc-js', '@grpc/proto-loader', 'protobufjs']) "
              "require.resolve(m)")
    return subprocess.run([node, "-e", script], cwd=NODE_DIR, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, check=False)


@pytest.fixture(scope="session")
def js_client() -> tuple[str, Path]:
    """(node executable, client.js), with the pinned npm dependencies installed."""
    node = _tool("node")
    npm = _tool("npm")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30,
                             check=False).stdout.strip()
    assert version.startswith("v") and int(version[1:].split(".")[0]) >= 18, (
        f"Node.js >= 18 is needed, found {version!r}")
    # Install when node_modules is missing or incomplete (e.g. an interrupted install).
    # --no-package-lock: the lock file would record registry URLs; package.json pins exact
    # versions instead.
    if not (NODE_DIR / "node_modules").is_dir() or _deps_resolve(node).returncode != 0:
        try:
            proc = subprocess.run(
                [npm, "install", "--no-package-lock", "--no-audit", "--no-fund",
                 "--loglevel=error"],
                cwd=NODE_DIR, capture_output=True, text=True, timeout=NPM_INSTALL_TIMEOUT_S,
                stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"npm install in {NODE_DIR} did not finish in {NPM_INSTALL_TIMEOUT_S} s")
        assert proc.returncode == 0, f"npm install in {NODE_DIR} failed\n{describe(proc)}"
        check = _deps_resolve(node)
        assert check.returncode == 0, (
            f"npm install succeeded but the dependencies do not resolve\n{describe(check)}")
    return node, NODE_DIR / "client.js"


def run_client(js_client: tuple[str, Path], node: NodeProcess, who: str, *, workspace: str,
               rid: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run client.js against the node; its JSON output."""
    node_exe, script = js_client
    pki = node.pki
    proc = run([node_exe, str(script), "--address", node.address,
                "--ca", str(pki / "ca.crt"), "--cert", str(pki / f"{who}.crt"),
                "--key", str(pki / f"{who}.key"), "--proto-dir", str(PROTO_DIR),
                "--rpc-include-dir", str(RPC_INCLUDE_DIR),
                "--workspace", workspace, "--id", rid], timeout=CLIENT_TIMEOUT_S)
    assert proc.returncode == 0, f"the Node.js client failed\n{describe(proc)}"
    try:
        return proc, json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"the Node.js client did not print JSON\n{describe(proc)}") from None


def test_rpc_protos_are_where_the_client_is_told_to_look() -> None:
    for name in ("status.proto", "error_details.proto"):
        assert (RPC_INCLUDE_DIR / "google" / "rpc" / name).is_file(), (
            f"googleapis-common-protos does not ship google/rpc/{name} in {RPC_INCLUDE_DIR}")


def test_grpc_js_client_puts_gets_and_lists_over_mtls(
    js_client: tuple[str, Path], node: NodeProcess
) -> None:
    proc, out = run_client(js_client, node, "client", workspace="js-ws", rid="js-1")
    ctx = describe(proc)
    assert out["grpc_js_version"] == "1.14.7", ctx

    op = out["execute"]
    assert op["state"] == "OPERATION_STATE_SUCCEEDED" and op["done"] is True, ctx
    assert op["outcome"] == "result", ctx
    assert op["idempotency_key"] == "js-js-1", ctx
    assert op["caller"].startswith("spiffe://tessera.local/client/"), ctx
    written = op["result"]["resource"]
    assert (written["version"], written["etag"]) == ("1", "v1"), ctx  # longs: String

    got = out["get"]["resource"]
    assert (got["workspace"], got["kind"], got["id"]) == ("js-ws", "task", "js-1"), ctx
    assert (got["title"], got["body"], got["owner"]) == (
        "from node.js", "written by @grpc/grpc-js", "ann"), ctx
    assert got["embedding"] == pytest.approx([0.5, -0.25, 1.0, 0.0]), ctx
    fields = got["attributes"]["fields"]
    assert fields["priority"]["numberValue"] == 2 and fields["lang"]["stringValue"] == "js", ctx
    assert (got["version"], got["etag"], got["source"]) == ("1", "v1", "local"), ctx
    assert int(got["create_time"]["seconds"]) > 0, ctx

    listed = out["list"]["resources"]
    assert [(r["workspace"], r["kind"], r["id"]) for r in listed] == [
        ("js-ws", "task", "js-1")], ctx
    assert not out["list"].get("next_page_token"), ctx


def test_grpc_js_client_sees_invalid_argument_with_bad_request_details(
    js_client: tuple[str, Path], node: NodeProcess
) -> None:
    proc, out = run_client(js_client, node, "client", workspace="js-bad", rid="js-2")
    bad = out["bad_request"]
    assert bad["code"] == INVALID_ARGUMENT, describe(proc)
    assert "key.workspace" in bad["details"], describe(proc)
    status = bad["status"]
    assert status is not None, f"no grpc-status-details-bin trailer\n{describe(proc)}"
    assert status["code"] == INVALID_ARGUMENT, describe(proc)
    assert status["detail_types"] == ["type.googleapis.com/google.rpc.BadRequest"], (
        describe(proc))
    assert status["field_violations"] == ["key.workspace"], describe(proc)
