"""`tessera load` against a real node: batches, bad lines by number, resume, idempotence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tessera_client.pb import query_pb2
from tests.fixtures.nodes import TEST_DIMENSION, NodeFactory, NodeProcess


def _line(i: int) -> str:
    return json.dumps({"workspace": "imp", "kind": "memory", "id": f"m{i:03d}",
                       "title": f"memory {i}", "embedding": [0.1 * (i % 7)] * TEST_DIMENSION,
                       "attributes": {"i": i}})


def _load(node: NodeProcess, path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tessera.cli", "load", str(path), "--data-dir", str(node.data_dir),
         "--batch-size", "7", *extra],
        capture_output=True, text=True, env=node.env, timeout=120)


async def _count(node: NodeProcess) -> list[int]:
    async with node.client() as c:
        resp = await c.query.ListResources(query_pb2.ListResourcesRequest(
            workspace="imp", page_size=1000))
    return [r.version for r in resp.resources]


async def test_load_reports_bad_lines_by_number_and_loads_the_rest(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = node_factory()
    lines = [_line(i) for i in range(20)]
    lines.insert(3, "{not json")
    lines.insert(8, json.dumps({"workspace": "imp", "kind": "memory"}))
    lines.insert(12, json.dumps({"workspace": "imp", "kind": "memory", "id": "x",
                                 "embedding": [1.0] * (TEST_DIMENSION + 2)}))
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    res = _load(node, path)
    assert res.returncode == 1, res.stderr
    assert "loaded 20 resources" in res.stdout
    assert "line 4: not JSON" in res.stdout
    assert "line 9: id is required" in res.stdout
    assert "line 13: INVALID_ARGUMENT" in res.stdout and "embedding" in res.stdout
    assert "lines" in res.stderr  # the progress output
    assert len(await _count(node)) == 20


async def test_load_resumes_from_its_checkpoint_and_never_applies_twice(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = node_factory()
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(_line(i) for i in range(10)) + "\n")
    assert _load(node, path).returncode == 0
    # More lines arrive; the checkpoint says the first ten are done (as after a crash).
    path.write_text("\n".join(_line(i) for i in range(25)) + "\n")
    (tmp_path / "data.jsonl.tessera-load.json").write_text(json.dumps({"lines_done": 10}))
    res = _load(node, path)
    assert res.returncode == 0, res.stderr
    assert "loaded 15 resources" in res.stdout and "10 lines were already loaded" in res.stdout
    # Starting over re-sends every line, but idempotency keys make it a no-op.
    assert _load(node, path, "--restart").returncode == 0
    assert await _count(node) == [1] * 25


def _no_traceback(res: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in res.stderr + res.stdout, res.stderr


async def test_load_waits_out_the_nodes_rate_limit_instead_of_failing(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    # 20 puts a second, bursts of 5: 60 lines at 16 in flight are refused many times.
    node = node_factory(env={"TESSERA_RATELIMIT_LOCAL_LIMITS": "command=20/5"})
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(_line(i) for i in range(60)) + "\n")
    res = _load(node, path)
    _no_traceback(res)
    assert res.returncode == 0, res.stderr
    assert "loaded 60 resources" in res.stdout
    assert "the node's rate limit refused" in res.stdout  # it was limited, and waited
    assert await _count(node) == [1] * 60


async def test_load_paced_by_rate_below_the_limit_is_never_refused(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = node_factory(env={"TESSERA_RATELIMIT_LOCAL_LIMITS": "command=40/10"})
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(_line(i) for i in range(30)) + "\n")
    res = _load(node, path, "--rate", "10", "--concurrency", "4")
    _no_traceback(res)
    assert res.returncode == 0, res.stderr
    assert "loaded 30 resources" in res.stdout
    assert "rate limit refused" not in res.stdout
    assert len(await _count(node)) == 30


async def test_load_on_the_default_rate_limit_loads_everything(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    """The node's defaults (command=500/s, burst 1000): 1,500 puts at 64 in flight."""
    node = node_factory()
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(_line(i) for i in range(1500)) + "\n")
    res = _load(node, path, "--concurrency", "64")
    _no_traceback(res)
    assert res.returncode == 0, res.stderr
    assert "loaded 1,500 resources" in res.stdout

