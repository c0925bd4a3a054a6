"""`tessera commands list`: the command types this installation executes."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from tessera.config import Config


def add_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None],
                 load: Callable[[argparse.Namespace], Config]) -> None:
    """Register `tessera commands ...`."""
    p = sub.add_parser("commands", help="command types and their handler plugins")
    verbs = p.add_subparsers(dest="verb", required=True)
    ls = verbs.add_parser("list", help="built-in and plugin command types (entry-point group "
                                       "tessera.commands) as a node started here loads them")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_list)


def _list(args: argparse.Namespace) -> int:
    from tessera.commands import Registry

    reg = Registry.default()
    rows = [{"type": r.handler.type, "source": r.source, "description": r.handler.description,
             "long_running": r.handler.long_running, "retry_safe": r.handler.retry_safe,
             "cancel_hook": r.handler.on_cancel is not None,
             "timeout_s": r.handler.timeout_s, "input_schema": dict(r.handler.input_schema)}
            for r in reg.all()]
    if args.json:
        print(json.dumps({"command_types": rows, "not_loaded": reg.load_errors}, indent=2))
        return 0
    print(f"{'type':24} {'source':28} {'runs':10} {'retry':5} {'timeout':>8}  description")
    for r in rows:
        runs = "background" if r["long_running"] else "inline"
        retry = "yes" if r["retry_safe"] else "no"
        print(f"{r['type']:24} {r['source']:28} {runs:10} {retry:5} "
              f"{r['timeout_s'] if r['long_running'] else '-':>8}  {r['description']}")
    for err in reg.load_errors:
        print(f"not loaded: {err}")
    return 0
