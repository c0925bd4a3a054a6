"""`tessera audit list | verify | prune`.

`list` and `verify` call the running node's AdminService with the admin certificate from
the data directory; `prune` works on the database directly, like `tessera migrate`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path
from typing import Any

from tessera.audit import prune
from tessera.cli._command import Command, Env
from tessera.cli._output import Column, enum_name
from tessera.core.codec import parse_duration
from tessera.core.errors import ConfigError, TesseraError

_OUTCOMES = ("allowed", "denied", "rate-limited", "failed")


def _when(text: str, flag: str) -> dt.datetime:
    """An age ('7d') back from now, or an ISO 8601 time (UTC if it names no zone)."""
    try:
        return dt.datetime.now(dt.UTC) - parse_duration(text)
    except ValueError:
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
    p.add_argument("--oldest-first", action="store_true",
                   help="oldest first (default: newest first)")
    p.add_argument("--follow", "-f", action="store_true",
                   help="print the newest --limit records oldest first, then every new one "
                        "as it is written, except its own polling calls (Ctrl-C stops)")
    p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)


_COLUMNS = (Column("SEQ", "sequence", align=">"), Column("TIME", "time"),
            Column("OUTCOME", "outcome"), Column("STATUS", "status"), Column("CALLER", "who"),
            Column("METHOD", "method"), Column("DETAILS", "details"))


def _row(r: Any) -> dict[str, Any]:
    from tessera_client.pb import admin_pb2

    details = " ".join(
        f"{k}={v}" for k, v in (("kind", r.kind), ("peer", r.peer), ("grant", r.grant),
                                ("reason", r.reason if r.status_code != "OK" else ""))
        if v)
    return {"sequence": r.sequence, "time": r.time.ToJsonString(),
            "outcome": enum_name(admin_pb2.AuditOutcome, r.outcome), "status": r.status_code,
            "who": r.identity or "(unauthenticated)", "method": f"{r.service}/{r.method}",
            "details": details}


def _show(env: Env, records: list[Any], *, header: bool = True) -> None:
    if env.out.json:
        for r in records:
            env.out.data(r, compact=True, flush=True)
    elif records:
        rows = [_row(r) for r in records]
        if header:
            env.out.table(rows, _COLUMNS)
        else:  # following: one line per record, aligned like the table as far as it goes
            for row in rows:
                env.out.line(" ".join(str(row[c.key]) for c in _COLUMNS), flush=True)


def _list(env: Env) -> int:
    from tessera_client.pb import admin_pb2

    args, out = env.args, env.out
    req = admin_pb2.ListAuditRecordsRequest(peer=args.peer, grant=args.grant,
                                            include_total_size=True)
    if args.outcome:
        name = "DENIED_BY_POLICY" if args.outcome == "denied" else args.outcome.upper()
        req.outcome = admin_pb2.AuditOutcome.Value("AUDIT_OUTCOME_" + name.replace("-", "_"))
    if args.since:
        req.start_time.FromDatetime(_when(args.since, "--since"))
    if args.until:
        req.end_time.FromDatetime(_when(args.until, "--until"))
    # Following starts from the newest records, shown in the order they were written.
    req.newest_first = args.follow or not args.oldest_first
    records: list[Any] = []
    total = 0
    with env.node().client() as c:
        while True:
            req.page_size = 1000 if not args.limit else min(1000, args.limit - len(records))
            resp = c.admin.ListAuditRecords(req)
            if not req.page_token:
                total = resp.total_size
                req.include_total_size = False
            records += resp.records
            if not resp.next_page_token or (args.limit and len(records) >= args.limit):
                break
            req.page_token = resp.next_page_token
        if args.follow:
            records.reverse()
        _show(env, records)
        if total > len(records):
            more = total - len(records)
            out.warn(f"{more:,} more record{'s' if more != 1 else ''} match"
                     f"{'es' if more == 1 else ''}; --limit 0 lists them all"
                     + ("" if args.follow else ", --since/--until narrow the range"))
        if not args.follow:
            return 0
        last = max((r.sequence for r in records), default=0)
        if not last:  # nothing yet: follow from the head of the log as it is now
            head = c.admin.ListAuditRecords(admin_pb2.ListAuditRecordsRequest(
                newest_first=True, page_size=1))
            last = head.records[0].sequence if head.records else 0
        own = f"spiffe://{env.cfg.node.trust_domain}/admin/admin"
        follow = admin_pb2.ListAuditRecordsRequest()
        follow.CopyFrom(req)
        follow.newest_first = False
        follow.page_token = ""
        follow.page_size = 1000
        while True:
            follow.after_sequence = last
            resp = c.admin.ListAuditRecords(follow)
            if resp.records:
                # Not its own polling: the local admin's ListAuditRecords calls.
                _show(env, [r for r in resp.records if not (
                    r.method == "ListAuditRecords" and r.identity == own)], header=False)
                last = resp.records[-1].sequence
            if not resp.next_page_token:
                time.sleep(args.interval)  # polling: the log has no push of its own


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
    from tessera.app import database

    now = dt.datetime.now(dt.UTC)
    try:
        cutoff = now - parse_duration(env.args.older_than)
    except ValueError as exc:
        raise ConfigError(f"--older-than: {exc}") from None
    raw = env.args.export
    export = None if raw is None else export_path(Path(raw).expanduser(), raw, now)
    with database(env.cfg) as dsn:
        result = prune(dsn, cutoff, export)
    where = f", exported to {result.exported_to}" if result.exported_to else ""
    env.out.line(f"pruned {result.pruned} audit records older than {cutoff.isoformat()}{where}; "
                 f"verification now starts after record {result.anchor_sequence}")
    return 0


LIST = Command("audit records, newest first; --follow for new ones (needs a running node)",
               _list, flags=_list_flags, json=True, address=True,
               json_help="one JSON object per line")
VERIFY = Command("check the hash chain (needs a running node)", _verify, address=True)
PRUNE = Command("export and delete records older than an age", _prune, flags=_prune_flags)
