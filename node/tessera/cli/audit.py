"""`tessera audit list | verify | prune`.

`list` and `verify` call the running node's AdminService with the admin certificate from
the data directory; `prune` works on the database directly, like `tessera migrate`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tessera.audit import parse_age, prune
from tessera.cli._client import local_node
from tessera.config import Config
from tessera.core.errors import ConfigError, TesseraError
from tessera.core.paths import NodePaths

Load = Callable[[argparse.Namespace], Config]
EmbeddedDsn = Callable[[NodePaths], "str | None"]

_OUTCOMES = ("allowed", "denied", "rate-limited", "failed")


def add_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None], load: Load,
                 embedded_dsn: EmbeddedDsn) -> None:
    """Add the `audit` command and its subcommands to the `tessera` parser."""
    audit = sub.add_parser("audit", help="query, verify and prune the audit log")
    asub = audit.add_subparsers(dest="audit_command", required=True)

    p = asub.add_parser("list", help="audit records, oldest first (needs a running node)")
    common(p)
    p.add_argument("--address", default=None, help="host:port of the node (default: node.json)")
    p.add_argument("--peer", default="", help="only calls of this peer")
    p.add_argument("--grant", default="", help="only calls under this grant")
    p.add_argument("--outcome", choices=_OUTCOMES, default=None)
    p.add_argument("--since", default=None,
                   help="only records at or after this: an age (1h, 7d) or an ISO 8601 time")
    p.add_argument("--until", default=None, help="only records before this (age or ISO time)")
    p.add_argument("--limit", type=int, default=100, help="most records to print (0: all)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=lambda a: _rpc(_list, a, load(a)))

    p = asub.add_parser("verify", help="check the hash chain (needs a running node)")
    common(p)
    p.add_argument("--address", default=None, help="host:port of the node (default: node.json)")
    p.set_defaults(func=lambda a: _rpc(_verify, a, load(a)))

    p = asub.add_parser("prune", help="export and delete records older than an age")
    common(p)
    p.add_argument("--older-than", required=True, help="age, e.g. 30d, 12h, 90m")
    p.add_argument("--export", type=Path, default=None,
                   help="write the removed records to this new JSON-lines file first")
    p.set_defaults(func=lambda a: _prune(a, load(a), embedded_dsn))


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


def _rpc(command: Callable[[argparse.Namespace, Config], int], args: argparse.Namespace,
         cfg: Config) -> int:
    """Run a command that calls the node; a failed call becomes one line, not a traceback."""
    import grpc

    try:
        return command(args, cfg)
    except grpc.RpcError as exc:
        code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
        details = exc.details() if hasattr(exc, "details") else ""
        raise TesseraError(f"the node answered {code}: {details}") from None


def _client(args: argparse.Namespace, cfg: Config) -> Any:
    from tessera_client import Client

    address, creds = local_node(cfg.node.data_dir)
    return Client(args.address or address, creds, server_name="localhost")


def _list(args: argparse.Namespace, cfg: Config) -> int:
    from google.protobuf import json_format

    from tessera_client.pb import admin_pb2

    req = admin_pb2.ListAuditRecordsRequest(peer=args.peer, grant=args.grant)
    if args.outcome:
        name = "DENIED_BY_POLICY" if args.outcome == "denied" else args.outcome.upper()
        req.outcome = admin_pb2.AuditOutcome.Value("AUDIT_OUTCOME_" + name.replace("-", "_"))
    if args.since:
        req.start_time.FromDatetime(_when(args.since, "--since"))
    if args.until:
        req.end_time.FromDatetime(_when(args.until, "--until"))
    printed = 0
    with _client(args, cfg) as c:
        while True:
            req.page_size = 1000 if not args.limit else min(1000, args.limit - printed)
            resp = c.admin.ListAuditRecords(req)
            for r in resp.records:
                if args.json:
                    print(json_format.MessageToJson(r, indent=None,
                                                    preserving_proto_field_name=True))
                else:
                    who = r.identity or "(unauthenticated)"
                    outcome = admin_pb2.AuditOutcome.Name(r.outcome).removeprefix(
                        "AUDIT_OUTCOME_")
                    print(f"{r.sequence:>8} {r.time.ToJsonString()} {outcome:16} "
                          f"{r.status_code:18} {who} {r.service}/{r.method}"
                          + (f" kind={r.kind}" if r.kind else "")
                          + (f" peer={r.peer}" if r.peer else "")
                          + (f" grant={r.grant}" if r.grant else "")
                          + (f" reason={r.reason}" if r.reason and r.status_code != "OK" else ""))
                printed += 1
            if not resp.next_page_token or (args.limit and printed >= args.limit):
                return 0
            req.page_token = resp.next_page_token


def _verify(args: argparse.Namespace, cfg: Config) -> int:
    from tessera_client.pb import admin_pb2

    with _client(args, cfg) as c:
        resp = c.admin.VerifyAudit(admin_pb2.VerifyAuditRequest())
    if resp.ok:
        print(f"audit chain ok: {resp.checked} records verified")
        return 0
    print(f"audit chain BROKEN at record {resp.first_bad_sequence}: {resp.message} "
          f"({resp.checked} records before it verified)", file=sys.stderr)
    return 1


def _prune(args: argparse.Namespace, cfg: Config, embedded_dsn: EmbeddedDsn) -> int:
    cutoff = dt.datetime.now(dt.UTC) - parse_age(args.older_than)
    paths = NodePaths(cfg.node.data_dir)
    dsn = cfg.store.dsn or embedded_dsn(paths)
    pg = None
    if not dsn:
        from tessera.embedded import EmbeddedPostgres

        pg = EmbeddedPostgres(paths.pgdata)
        dsn = pg.start()
    try:
        result = prune(dsn, cutoff, args.export)
    finally:
        if pg is not None:
            pg.stop()
    where = f", exported to {result.exported_to}" if result.exported_to else ""
    print(f"pruned {result.pruned} audit records older than {cutoff.isoformat()}{where}; "
          f"verification now starts after record {result.anchor_sequence}")
    return 0

