"""docs/commands.md's agent example, run as pasted against `tessera serve` (embedded tier).

The fenced block after `<!-- doc-test -->` in "Worked example: agent runs" is run by a
shell, as root, from the repository root, with HOME and TMPDIR set to a fresh directory
(the default data directory is then ~/.local/share/tessera inside it). Only the listen
address is set from outside, to a free port, so parallel runs do not collide.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Agent runs are host-wide (uids, processes): one such test at a time across pytest-xdist
#: workers (tests/conftest.py), so "no agent process is left" sees only this test's.
pytestmark = pytest.mark.agents

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "commands.md"
MARKER = "<!-- doc-test -->"
AGENT_UIDS = range(1_900_000_000, 1_900_065_536)
#: initdb, migrations and certificates of a fresh embedded node, then the agent runs.
TIMEOUT_S = 300


def doc_blocks(text: str, section: str) -> list[str]:
    """The fenced blocks right after a doc-test marker inside `section` (a heading)."""
    start = text.index(section)
    end = text.find("\n## ", start + len(section))
    body = text[start:end if end >= 0 else len(text)]
    return re.findall(MARKER + r"\n```(?:sh|bash)\n(.*?)\n```", body, flags=re.S)


@pytest.fixture
def home() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("the agent example runs as root (it switches agents to other uids)")
    path = Path(tempfile.mkdtemp(prefix="tessera-docs-", dir="/tmp"))
    yield path
    if not os.environ.get("KEEP_AGENT_TEST_DIR"):
        shutil.rmtree(path, ignore_errors=True)


def test_the_agent_example_runs_as_pasted_on_a_fresh_data_directory(home: Path) -> None:
    (block,) = doc_blocks(DOC.read_text(), "## Worked example: agent runs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env.update({"HOME": str(home), "TMPDIR": str(home),
                "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}",
                "TESSERA_NODE_LISTEN_ADDRESS": "127.0.0.1:0"})
    proc = subprocess.Popen(["/bin/bash", "-c", block], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        log = (home / "tessera-serve.log").read_text(errors="replace")
        pytest.fail(f"the example did not finish:\n{out}\n--- serve log:\n{log[-3000:]}")
    log = (home / "tessera-serve.log").read_text(errors="replace")
    said = f"{out}\n--- serve log:\n{log[-3000:]}"
    assert proc.returncode == 0, said
    data = home / ".local" / "share" / "tessera"
    # The data directory is closed: only embedded PostgreSQL's own group may traverse it.
    mode = stat.S_IMODE(data.stat().st_mode)
    assert mode & 0o067 == 0, f"{mode:o}"
    key = data / "pki" / "node.key"
    # The watched run: greeted, its own uid of the range, the node's key out of reach.
    assert "hello world\n" in out and "bye world\n" in out, said
    ids = re.search(r"^uid=(\d+) gid=(\d+) groups=(\d+)$", out, flags=re.M)
    assert ids is not None and len(set(ids.groups())) == 1, said
    assert int(ids.group(1)) in AGENT_UIDS
    assert f"read {key}: denied" in out and "read /etc/hostname: allowed" in out, said
    assert "line 1 of 2: the quick brown fox" in out
    # status, then kill of the sleeping run: two JSON objects, RUNNING then CANCELLED.
    answers = [json.loads(m) for m in re.findall(r"^\{\n.*?^\}$", out, flags=re.M | re.S)]
    states = [a.get("state") for a in answers]
    assert states == ["RUNNING", "CANCELLED"], said
    assert answers[0]["uid"] in AGENT_UIDS and answers[0]["pgid"] > 1
    assert "INVALID_ARGUMENT" in out and "plugin.args.args.name" in out
    assert "refused, as it should be" in out
    assert "tessera: stopped" in log, said
    # Nothing of any run is left.
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            uid_line = next(ln for ln in status.splitlines() if ln.startswith("Uid:"))
            uids = {int(v) for v in uid_line.split()[1:]}
            assert not any(u in AGENT_UIDS for u in uids), (entry, status[:200])


def test_a_data_directory_left_open_is_tightened_and_said(
        home: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An existing data directory that others may read is closed at start (logged)."""
    from tessera.app import prepare_data_dir
    from tessera.core.paths import NodePaths

    data = home / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="tessera.app"):
        prepare_data_dir(NodePaths(data))
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert any(f"{data} was mode 755" in r.getMessage() and "tightened to 700"
               in r.getMessage() for r in caplog.records), caplog.text
    # Already closed: left as it is, nothing said.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tessera.app"):
        prepare_data_dir(NodePaths(data))
    assert stat.S_IMODE(data.stat().st_mode) == 0o700 and not caplog.records
    fresh = home / "fresh" / "data"
    prepare_data_dir(NodePaths(fresh))
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
