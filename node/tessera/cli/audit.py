"""`tessera audit list | verify | prune`.

`list` and `verify` call the running node's AdminService with the admin certificate from
the data directory; `prune` works on the database directly, like `tessera migrate`.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from tessera.audit import parse_age, prune
from tessera.cli._command import Command, Env
from tessera.cli._output import enum_name
from tessera.core.errors import ConfigError, TesseraError
from tessera.core.paths import NodePaths

_OUTCOMES = ("allowed", "denied", "rate-limited", "failed")


def _when(text: str, flag: str) -> dt.datetime:
    """An age ('7d') back from now, or an ISO 8601 time (UTC if it names no zone)."""
    try:
        return dt.datetime.now(dt.UTC) - parse_age(text)
    except ConfigError:
        pass
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{flag}: {text!r} is neither an age (7d) nor an ISO time") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def _list_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peer", default="", help="only calls of this peer")
    p.add_argument("--grant", default="", help="only calls under this grant")
    p.add_argument("--outcome", choices=_OUTCOMES, default=None)
    p.add_argument("--since", default=None,
                   help="only records at or after this: an age (1h, 7d) or an ISO 8601 time")
    p.add_argument("--until", default=None, help="only records before this (age or ISO time)")
    p.add_argument("--limit", type=int, default=100, help="most records to print (0: all)")


def _list(env: Env) -> int:
    from tessera_client.pb import admin_pb2

    args, out = env.args, env.out
    req = admin_pb2.ListAuditRecordsRequest(peer=args.peer, grant=args.grant)
    if args.outcome:
        name = "DENIED_BY_POLICY" if args.outcome == "denied" else args.outcome.upper()
        req.outcome = admin_pb2.AuditOutcome.Value("AUDIT_OUTCOME_" + name.replace("-", "_"))
    if args.since:
        req.start_time.FromDatetime(_when(args.since, "--since"))
    if args.until:
        req.end_time.FromDatetime(_when(args.until, "--until"))
    printed = 0
    with env.node().client() as c:
        while True:
            req.page_size = 1000 if not args.limit else min(1000, args.limit - printed)
            resp = c.admin.ListAuditRecords(req)
            for r in resp.records:
                if out.json:
                    out.data(r, compact=True)
                else:
                    who = r.identity or "(unauthenticated)"
                    outcome = enum_name(admin_pb2.AuditOutcome, r.outcome)
                    out.line(f"{r.sequence:>8} {r.time.ToJsonString()} {outcome:16} "
                             f"{r.status_code:18} {who} {r.service}/{r.method}"
                             + (f" kind={r.kind}" if r.kind else "")
                             + (f" peer={r.peer}" if r.peer else "")
                             + (f" grant={r.grant}" if r.grant else "")
                             + (f" reason={r.reason}"
                                if r.reason and r.status_code != "OK" else ""))
                printed += 1
            if not resp.next_page_token or (args.limit and printed >= args.limit):
                return 0
            req.page_token = resp.next_page_token


def _verify(env: Env) -> int:
    from tessera_client.pb import admin_pb2

    with env.node().client() as c:
        resp = c.admin.VerifyAudit(admin_pb2.VerifyAuditRequest())
    if resp.ok:
        env.out.line(f"audit chain ok: {resp.checked} records verified")
        return 0
    env.out.warn(f"audit chain BROKEN at record {resp.first_bad_sequence}: {resp.message} "
                 f"({resp.checked} records before it verified)")
    return 1


def _prune_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--older-than", required=True, help="age, e.g. 30d, 12h, 90m")
    p.add_argument("--export", default=None, metavar="FILE|DIR/",
                   help="write the removed records to this new JSON-lines file first (a "
                        "directory, existing or ending in /, gets audit-<time>.jsonl; "
                        "missing directories are created)")


def export_path(export: Path, raw: str, now: dt.datetime) -> Path:
    """The file `--export` names: inside it when it is a directory; its parents created."""
    if export.is_dir() or raw.endswith(("/", "\\")):
        export = export / f"audit-{now.strftime('%Y%m%dT%H%M%SZ')}.jsonl"
    try:
        export.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TesseraError(f"--export: cannot create the directory {export.parent} "
                           f"({exc.strerror})") from None
    return export


def _prune(env: Env) -> int:
    from tessera.embedded import running_postgres_dsn

    cfg = env.cfg
    now = dt.datetime.now(dt.UTC)
    cutoff = now - parse_age(env.args.older_than)
    raw = env.args.export
    export = None if raw is None else export_path(Path(raw).expanduser(), raw, now)
    paths = NodePaths(cfg.node.data_dir)
    dsn = cfg.store.dsn or running_postgres_dsn(paths.pgdata)
    pg = None
    if not dsn:
        from tessera.embedded import EmbeddedPostgres

        pg = EmbeddedPostgres(paths.pgdata)
        dsn = pg.start()
    try:
        result = prune(dsn, cutoff, export)
    finally:
        if pg is not None:
            pg.stop()
    where = f", exported to {result.exported_to}" if result.exported_to else ""
    env.out.line(f"pruned {result.pruned} audit records older than {cutoff.isoformat()}{where}; "
                 f"verification now starts after record {result.anchor_sequence}")
    return 0


LIST = Command("audit records, oldest first (needs a running node)", _list, flags=_list_flags,
               json=True, address=True, json_help="one JSON object per line")
VERIFY = Command("check the hash chain (needs a running node)", _verify, address=True)
PRUNE = Command("export and delete records older than an age", _prune, flags=_prune_flags)
