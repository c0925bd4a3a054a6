"""`tessera ratelimit show <subject>`: effective limits and recent rejections.

(`tessera doctor` shows the running node's limiter check: cli/doctor.py.)
"""

from __future__ import annotations

import argparse

from tessera.cli._command import Command, Env
from tessera.cli._output import Printer, rfc3339
from tessera_client.pb import admin_pb2


def _show_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("subject", help="grant name (grants/<id>) or local identity URI")


def _show(env: Env) -> int:
    with env.node().client() as c:
        st = c.admin.GetRateLimitStatus(
            admin_pb2.GetRateLimitStatusRequest(subject=env.args.subject), timeout=10)
    env.out.result(st, lambda: _print(env.out, st))
    return 0


def _print(out: Printer, st: admin_pb2.RateLimitStatus) -> None:
    out.line(f"subject:  {st.subject}")
    out.line(f"enabled:  {'yes' if st.enabled else 'no'}")
    out.line(f"backend:  {st.backend}")
    window = st.recent_window.seconds
    out.line(f"{'class':8} {'rate/s':>9} {'burst':>6}  {'source':13} "
             f"{f'rejected ({window // 60} min)':>18}  last rejection")
    for lim in st.limits:
        rate = "unlimited" if lim.limit.rate_per_s <= 0 else f"{lim.limit.rate_per_s:g}"
        last = (rfc3339(lim.last_rejection_time.ToDatetime())
                if lim.HasField("last_rejection_time") else "-")
        out.line(f"{lim.method_class:8} {rate:>9} {lim.limit.burst:>6}  {lim.source:13} "
                 f"{lim.recent_rejections:>18}  {last}")


SHOW = Command("effective limits and recent rejections of a subject", _show,
               flags=_show_flags, json=True, address=True)
