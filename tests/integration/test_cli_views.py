"""What the CLI shows people (tables) and scripts (--json), against real nodes.

`tessera status`, `peers list` in both directions, `grants list|preview`, `audit list`
newest first with "N more" and `--follow`, human durations in `certs status`.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from tessera_client import Client
from tests.fixtures.calls import put, run_cli
from tests.fixtures.nodes import NodeFactory
from tests.fixtures.peers import Peering


def _ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    return res.stdout


async def test_status_says_running_or_not(node_factory: NodeFactory, tmp_path: Path) -> None:
    node = node_factory()
    human = _ok(run_cli(node, "status"))
    assert f"running (pid {node.state['pid']})" in human
    assert node.address in human and "health" in human and "expires in" in human
    data = json.loads(_ok(run_cli(node, "status", "--json")))
    assert data["running"] is True and data["pid"] == node.state["pid"]
    assert data["address"] == node.address and data["workers"] == len(node.serving_pids)
    assert data["health"] in ("GREEN", "YELLOW")
    assert data["certificate"]["state"] == "HEALTHY"  # enum names without their prefix
    assert data["start_time"].endswith("Z")  # RFC 3339
    stopped = run_cli(None, "status", "--data-dir", str(tmp_path / "nothing-here"), env=node.env)
    assert stopped.returncode == 3
    assert "not running" in stopped.stdout and "tessera serve --data-dir" in stopped.stdout
    gone = json.loads(run_cli(None, "status", "--json", "--data-dir", str(tmp_path / "x"),
                              env=node.env).stdout)
    assert gone["running"] is False


async def test_peers_both_ways_and_grant_preview(
    node_factory: NodeFactory, peering: Peering
) -> None:
    b = node_factory(name="b")
    a = node_factory(name="a")
    async with b.client() as c:
        for ws, kind, rid in (("acme", "task", "t1"), ("acme", "task", "t2"),
                              ("acme", "note", "n1"), ("other", "task", "x1")):
            await c.command.Execute(put(ws, kind, rid))
    token = await peering.invite(b, "a")
    _ok(run_cli(b, "grants", "create", "--peer", "a", "--kinds", "task,note",
                "--workspaces", "acme"))
    assert peering.join_cli(token, a).returncode == 0

    # a joined b: shown under the peers a calls; b shows a calling it.
    on_a = _ok(run_cli(a, "peers", "list"))
    joined_part = on_a.split("Peers this node has joined")[1]
    assert "b " in joined_part and "spiffe://tessera.local/node/a" in joined_part
    on_b = _ok(run_cli(b, "peers", "list"))
    inbound_part = on_b.split("Peers this node has joined")[0]
    assert "a " in inbound_part and "ACTIVE" in inbound_part and "in 29 days" in inbound_part
    assert [j["name"] for j in json.loads(_ok(run_cli(a, "peers", "list", "--json")))
            ["joined"]] == ["b"]

    table = _ok(run_cli(b, "grants", "list")).splitlines()
    assert table[0].split()[:3] == ["NAME", "PEER", "KINDS"]
    assert "note,task" in table[1] and "active" in table[1]

    preview = _ok(run_cli(b, "grants", "preview", "a"))
    assert "a can read 3 local rows now, under 1 grant" in preview
    assert "rows in scope  3 (note 1, task 2)" in preview
    data = json.loads(_ok(run_cli(b, "grants", "preview", "a", "--json")))
    assert data["rows_in_scope"] == "3"  # int64 as proto JSON writes it
    assert data["grants"][0]["rows_by_kind"] == {"task": "2", "note": "1"}
    unknown = run_cli(b, "grants", "preview", "nobody")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr


async def test_audit_list_newest_first_says_how_many_more(node_factory: NodeFactory) -> None:
    node = node_factory()
    async with node.client() as c:
        for i in range(6):
            await c.command.Execute(put("w", "note", f"n{i}"))
    res = run_cli(node, "audit", "list", "--limit", "3", "--json")
    seqs = [int(json.loads(line)["sequence"]) for line in _ok(res).splitlines()]
    assert seqs == sorted(seqs, reverse=True) and len(seqs) == 3
    assert "more records match" in res.stderr
    oldest = run_cli(node, "audit", "list", "--limit", "3", "--json", "--oldest-first")
    assert [int(json.loads(x)["sequence"]) for x in _ok(oldest).splitlines()] == [1, 2, 3]
    table = _ok(run_cli(node, "audit", "list", "--limit", "2")).splitlines()
    assert table[0].split()[:3] == ["SEQ", "TIME", "OUTCOME"] and len(table) == 3


def test_audit_list_follow_prints_new_records(node_factory: NodeFactory) -> None:
    node = node_factory()
    follower = subprocess.Popen(
        [sys.executable, "-m", "tessera.cli", "audit", "list", "--follow", "--json",
         "--limit", "1", "--interval", "0.2", "--data-dir", str(node.data_dir)],
        env=node.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: queue.Queue[str] = queue.Queue()
    assert follower.stdout is not None
    reader = threading.Thread(target=lambda: [lines.put(x) for x in follower.stdout],
                              daemon=True)
    reader.start()
    try:
        with Client(node.address, node.credentials()) as c:
            c.command.Execute(put("w", "note", "before"))
            deadline = time.monotonic() + 60
            seen: list[dict[str, str]] = []
            put_after = False
            while time.monotonic() < deadline:
                try:
                    seen.append(json.loads(lines.get(timeout=0.5)))
                except queue.Empty:
                    pass
                if seen and not put_after:  # the follower is up: write something new
                    c.command.Execute(put("w", "note", "after-follow"))
                    put_after = True
                if put_after and any(
                        r.get("method") == "Execute" and int(r["sequence"])
                        > int(seen[0]["sequence"]) for r in seen):
                    break
        assert put_after and any(r.get("method") == "Execute" for r in seen[1:]), seen
        sequences = [int(r["sequence"]) for r in seen]
        assert sequences == sorted(sequences)  # in the order they were written
    finally:
        follower.terminate()
        follower.wait(30)
        reader.join(30)
        follower.stdout.close()


async def test_certs_status_shows_human_durations(node_factory: NodeFactory) -> None:
    node = node_factory()
    out = _ok(run_cli(node, "certs", "status"))
    assert "(in 29 days)" in out or "(in 30 days)" in out
    assert " s)" not in out
