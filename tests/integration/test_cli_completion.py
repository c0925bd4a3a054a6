"""`tessera completion bash|zsh`: scripts generated from the parser, completing in a shell."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _script(shell: str) -> str:
    res = subprocess.run([sys.executable, "-m", "tessera.cli", "completion", shell],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _complete(script: Path, *words: str) -> list[str]:
    """What bash offers for the last of `words`, with the generated script loaded."""
    quoted = " ".join(f"'{w}'" for w in ("tessera", *words))
    probe = (f"source {script}; COMP_WORDS=({quoted}); COMP_CWORD={len(words)}; "
             f'COMP_LINE="${{COMP_WORDS[*]}}"; COMP_POINT=${{#COMP_LINE}}; '
             '_shtab_tessera; printf "%s\\n" "${COMPREPLY[@]}"')
    res = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


def test_bash_completes_commands_verbs_and_options(tmp_path: Path) -> None:
    script = tmp_path / "tessera.bash"
    script.write_text(_script("bash"))
    assert _complete(script, "pe") == ["peers"]
    assert _complete(script, "grants", "p") == ["preview"]
    assert "--oldest-first" in _complete(script, "audit", "list", "--ol")
    assert "status" in _complete(script, "st")
    assert _complete(script, "completion", "z") == ["zsh"]


def test_zsh_script_is_generated_from_the_same_parser() -> None:
    text = _script("zsh")
    assert text.startswith("#compdef tessera")
    for word in ("peers", "preview", "--oldest-first", "--follow", "status"):
        assert word in text, word
