"""Run the node under cProfile: `python -m bench.profile_node --out FILE -- serve ...`.

The harness uses this instead of `python -m tessera.cli` when BENCH_PROFILE_NODE names an
output file, so the node's code stays untouched. Read the result with
`python -m pstats FILE` (sort tottime). cProfile slows the node down: use it to see where
time goes, not for figures.
"""

from __future__ import annotations

import argparse
import cProfile
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Run `tessera <args>` under cProfile and write the stats when it exits."""
    p = argparse.ArgumentParser(prog="python -m bench.profile_node", description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of `tessera`, after --")
    ns = p.parse_args(argv)
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args

    from tessera.cli import main as tessera_main

    profiler = cProfile.Profile()
    try:
        code: int = profiler.runcall(tessera_main, args)
    finally:
        profiler.dump_stats(ns.out)
    return code


if __name__ == "__main__":
    sys.exit(main())
