"""`tessera grants create|list|show|revoke`: what a peer may read, call and follow.

Every command calls the running node's AdminService with the local admin certificate;
lists are tables (--json for scripts), other answers JSON.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from typing import Any

from tessera.cli._command import Command, Env
from tessera.cli._output import Column, human_when
from tessera_client.pb import admin_pb2


def _split(text: str | None) -> list[str]:
    return [v.strip() for v in (text or "").split(",") if v.strip()]


def _grant_from_args(a: argparse.Namespace) -> admin_pb2.Grant:
    g = admin_pb2.Grant(
        peer=a.peer, kinds=_split(a.kinds), excluded_kinds=_split(a.exclude_kinds),
        workspaces=_split(a.workspaces), teams=_split(a.teams), subject_user=a.subject_user,
        include_personal=a.include_personal, row_cap=a.row_cap,
        command_types=_split(a.commands), event_types=_split(a.events),
    )
    if a.rate or a.burst:
        g.rate_limit.rate_per_s = a.rate
        g.rate_limit.burst = a.burst
    if a.row_budget:
        g.row_budget = a.row_budget
    if a.row_budget_window_s:
        g.row_budget_window.seconds = a.row_budget_window_s
    if a.expires_in_s:
        g.expire_time.FromDatetime(datetime.now(UTC) + timedelta(seconds=a.expires_in_s))
    return g


def _create_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peer", required=True)
    p.add_argument("--kinds", required=True, help="comma-separated kinds")
    p.add_argument("--exclude-kinds", default="")
    p.add_argument("--workspaces", default="", help="comma-separated, '*' for all")
    p.add_argument("--teams", default="")
    p.add_argument("--subject-user", default="")
    p.add_argument("--include-personal", action="store_true")
    p.add_argument("--row-cap", type=int, default=0, help="most rows per page")
    p.add_argument("--row-budget", type=int, default=0,
                   help="most rows the peer may read per --row-budget-window-s, on every "
                        "replica together (0: no budget)")
    p.add_argument("--row-budget-window-s", type=int, default=0,
                   help="rolling window of --row-budget in seconds (default 3600)")
    p.add_argument("--commands", default="", help="e.g. resource.put,resource.delete")
    p.add_argument("--events", default="", help="event type patterns, e.g. task.*")
    p.add_argument("--rate", type=float, default=0.0, help="calls per second")
    p.add_argument("--burst", type=int, default=0)
    p.add_argument("--expires-in-s", type=int, default=0)


def _create(env: Env) -> int:
    with env.node().client() as c:
        env.out.data(c.admin.CreateGrant(
            admin_pb2.CreateGrantRequest(grant=_grant_from_args(env.args))))
    return 0


def _list_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peer", default="")
    p.add_argument("--include-revoked", action="store_true")


def _list(env: Env) -> int:
    with env.node().client() as c:
        resp = c.admin.ListGrants(admin_pb2.ListGrantsRequest(
            peer=env.args.peer, include_revoked=env.args.include_revoked))
    env.out.result(resp, lambda: _list_table(env, resp))
    return 0


def _csv(values: Any) -> str:
    return ",".join(values) or "-"


def _list_table(env: Env, resp: admin_pb2.ListGrantsResponse) -> None:
    if not resp.grants:
        env.out.line("no grants (`tessera grants create --peer NAME ...` makes one)")
        return
    env.out.table([{
        "name": g.name, "peer": g.peer, "kinds": _csv(g.kinds),
        "workspaces": _csv(g.workspaces), "teams": _csv(g.teams),
        "row_cap": g.row_cap or "-",
        "expires": human_when(g.expire_time) or "never",
        "state": "revoked" if g.revoked else "active",
    } for g in resp.grants], _GRANT_COLUMNS)


_GRANT_COLUMNS = (Column("NAME", "name"), Column("PEER", "peer"), Column("KINDS", "kinds"),
                  Column("WORKSPACES", "workspaces"), Column("TEAMS", "teams"),
                  Column("ROW CAP", "row_cap", align=">"), Column("EXPIRES", "expires"),
                  Column("STATE", "state"))


def _preview_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("peer", help="the peer whose view to show")


def _preview(env: Env) -> int:
    with env.node().client() as c:
        resp = c.admin.PreviewGrants(admin_pb2.PreviewGrantsRequest(peer=env.args.peer))
    env.out.result(resp, lambda: _preview_text(env, resp))
    return 0


def _preview_text(env: Env, resp: admin_pb2.PreviewGrantsResponse) -> None:
    out, peer = env.out, env.args.peer
    if not resp.grants:
        out.line(f"{peer} can see nothing: no grant in force "
                 f"(`tessera grants create --peer {peer} ...`)")
        return
    n = resp.rows_in_scope
    out.line(f"{peer} can read {n:,} local row{'s' if n != 1 else ''} now, under "
             f"{len(resp.grants)} grant{'s' if len(resp.grants) != 1 else ''}:")
    for p in resp.grants:
        g = p.grant
        out.line("")
        rate = (f"{g.rate_limit.rate_per_s:g}/s, burst {g.rate_limit.burst}"
                if g.HasField("rate_limit") else "the node's peer defaults")
        rows: list[tuple[str, str]] = [
            ("grant", g.name),
            ("kinds", _csv(p.readable_kinds)
             + (f" (excluded: {_csv(g.excluded_kinds)})" if g.excluded_kinds else "")),
            ("workspaces", _csv(g.workspaces) if g.workspaces else "any (teams below)"),
            ("teams", _csv(g.teams) if g.teams else "any"),
            ("personal data", "withheld from " + g.subject_user
             if g.subject_user and not g.include_personal else "not withheld"),
            ("row cap", f"{g.row_cap} per page" if g.row_cap else "the node's page size"),
            ("row budget", f"{g.row_budget} per {g.row_budget_window.seconds} s"
             if g.row_budget else "none"),
            ("rate limit", rate),
            ("commands", _csv(g.command_types) if g.command_types else "none"),
            ("events", _csv(g.event_types) if g.event_types else "none"),
            ("expires", human_when(g.expire_time) or "never"),
            ("rows in scope", f"{p.rows_in_scope:,}" + (" (" + ", ".join(
                f"{k} {v:,}" for k, v in sorted(p.rows_by_kind.items())) + ")"
                if p.rows_by_kind else "")),
        ]
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            out.line(f"  {k:<{width}}  {v}")


def _name_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="grants/<uuid>")


def _show(env: Env) -> int:
    with env.node().client() as c:
        env.out.data(c.admin.GetGrant(admin_pb2.GetGrantRequest(name=env.args.name)))
    return 0


def _revoke(env: Env) -> int:
    with env.node().client() as c:
        env.out.data(c.admin.RevokeGrant(admin_pb2.RevokeGrantRequest(name=env.args.name)))
    return 0


CREATE = Command("grant a peer access (default deny for the rest)", _create, flags=_create_flags)
LIST = Command("list grants", _list, flags=_list_flags, json=True)
PREVIEW = Command("show what a peer can see now: its grants and the rows in scope",
                  _preview, flags=_preview_flags, json=True)
SHOW = Command("show one grant", _show, flags=_name_flag)
REVOKE = Command("revoke a grant (effective on the peer's next call)", _revoke,
                 flags=_name_flag)
