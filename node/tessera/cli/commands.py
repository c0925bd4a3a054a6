"""`tessera commands list`: the command types this installation executes."""

from __future__ import annotations

from tessera.cli._command import Command, Env
from tessera.cli._output import Column


def _list(env: Env) -> int:
    from tessera.commands import Registry

    out = env.out
    reg = Registry.default()
    rows = [{"type": r.handler.type, "source": r.source, "description": r.handler.description,
             "long_running": r.handler.long_running, "retry_safe": r.handler.retry_safe,
             "cancel_hook": r.handler.on_cancel is not None,
             "timeout_s": r.handler.timeout_s, "input_schema": dict(r.handler.input_schema)}
            for r in reg.all()]
    if out.json:
        out.data({"command_types": rows, "not_loaded": reg.load_errors})
        return 0
    for r in rows:
        r["timeout_label"] = r["timeout_s"] if r["long_running"] else "-"
    out.table(rows, (
        Column("type", "type", 24), Column("source", "source", 28),
        Column("runs", "long_running", 10, show=lambda v: "background" if v else "inline"),
        Column("retry", "retry_safe", 5, show=lambda v: "yes" if v else "no"),
        Column("timeout", "timeout_label", 8, align=">"),
        Column("description", "description")))
    for err in reg.load_errors:
        out.line(f"not loaded: {err}")
    return 0


LIST = Command("built-in and plugin command types (entry-point group tessera.commands) as a "
               "node started here loads them", _list, json=True, data_dir=False)
