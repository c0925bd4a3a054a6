"""`tessera agents list|spawn|status|kill`: allow-listed agent runs on the local node.

`list` reads the allow-list from the configuration (no node needed). The others call the
running node's CommandService with the local client certificate: `spawn` executes
`agent.spawn` (an operation), `status` is GetOperation, `kill` is CancelOperation (the
whole process group: SIGTERM, then SIGKILL after agents.kill_grace_s).
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from tessera import config
from tessera.cli._client import local_node
from tessera_client import Client
from tessera_client.pb import command_pb2

Load = Callable[[argparse.Namespace], config.Config]


def add_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None],
                 load: Load) -> None:
    """Register `tessera agents ...`."""
    p = sub.add_parser("agents", help="run allow-listed agents ([agents.<name>] in the config)")
    verbs = p.add_subparsers(dest="verb", required=True)

    ls = verbs.add_parser("list", help="the allow-list as this configuration defines it")
    common(ls)
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=lambda a: _list(load(a), a.json))

    sp = verbs.add_parser("spawn", help="start an agent; prints its operation")
    common(sp)
    sp.add_argument("agent", help="an allow-listed agent name")
    sp.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                    help="a declared argument (VALUE is JSON if it parses, else a string)")
    sp.add_argument("--key", default="", help="idempotency key (default: a new one)")
    sp.add_argument("--watch", action="store_true",
                    help="stream the agent's output; exit 0 if the run succeeded, else 1")
    sp.set_defaults(func=lambda a: _spawn(load(a), a))

    for verb, helptext in (("status", "show an agent run (its operation)"),
                           ("kill", "end an agent run: its whole process group")):
        v = verbs.add_parser(verb, help=helptext)
        common(v)
        v.add_argument("operation", help="operations/<uuid>, as spawn printed")
        v.set_defaults(func=lambda a, verb=verb: _one(load(a), verb, a.operation))


def _list(cfg: config.Config, as_json: bool) -> int:
    from tessera.commands import parse_agents

    specs = parse_agents(cfg.agents, cfg.node.data_dir)
    rows: list[dict[str, Any]] = [{"name": s.name, "executable": s.executable, "args": list(s.args),
             "params": list(s.params), "schema": dict(s.schema), "env": list(s.env),
             "cwd": s.cwd, "time_limit_s": s.time_limit_s,
             "output_limit_bytes": s.output_limit_bytes, "max_per_grant": s.max_per_grant,
             "max_per_node": s.max_per_node, "description": s.description}
            for s in specs.values()]
    if as_json:
        print(json.dumps({"user": cfg.agents.user, "agents": rows}, indent=2))
        return 0
    print(f"agents run as: {cfg.agents.user or '(agents.user is not set)'}")
    for r in rows:
        line = " ".join([r["executable"], *r["args"], "--", *(f"<{p}>" for p in r["params"])])
        print(f"{r['name']:16} {line}")
        print(f"{'':16} time {r['time_limit_s']:g} s, output {r['output_limit_bytes']} bytes, "
              f"{r['max_per_grant']} per grant, {r['max_per_node']} per node")
    if not rows:
        print("no agents are allowed (add [agents.<name>] tables to the config)")
    return 0


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _client(cfg: config.Config) -> Client:
    # Operations belong to their caller: spawn, status and kill use one local identity.
    address, creds = local_node(cfg.node.data_dir, "client")
    return Client(address, creds, server_name="localhost")


def _print(op: command_pb2.Operation) -> None:
    print(json_format.MessageToJson(op, preserving_proto_field_name=True, indent=2))


def _spawn(cfg: config.Config, a: argparse.Namespace) -> int:
    values: dict[str, Any] = {}
    for item in a.arg:
        name, sep, text = item.partition("=")
        if not sep or not name:
            print(f"tessera: --arg {item!r}: expected NAME=VALUE", file=sys.stderr)
            return 2
        values[name] = _value(text)
    args = struct_pb2.Struct()
    args.update({"agent": a.agent, "args": values})
    request = command_pb2.ExecuteRequest(
        idempotency_key=a.key or f"agents-cli-{uuid.uuid4()}",
        plugin=command_pb2.PluginCommand(type="agent.spawn", args=args))
    with _client(cfg) as c:
        try:
            op = c.command.Execute(request)
            if not a.watch:
                _print(op)
                return 0
            print(f"{op.name}", file=sys.stderr)
            last = op
            for msg in c.command.WatchOperation(command_pb2.WatchOperationRequest(name=op.name)):
                if msg.output_chunk:
                    sys.stdout.write(msg.output_chunk)
                    sys.stdout.flush()
                last = msg
        except grpc.RpcError as exc:
            print(f"tessera: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    state = command_pb2.OperationState.Name(last.state).removeprefix("OPERATION_STATE_")
    if last.error.message:
        print(f"tessera: {op.name} {state}: {last.error.message}", file=sys.stderr)
    return 0 if state == "SUCCEEDED" else 1


def _one(cfg: config.Config, verb: str, name: str) -> int:
    with _client(cfg) as c:
        try:
            if verb == "status":
                op = c.command.GetOperation(command_pb2.GetOperationRequest(name=name))
            else:
                op = c.command.CancelOperation(command_pb2.CancelOperationRequest(name=name))
        except grpc.RpcError as exc:
            print(f"tessera: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    _print(op)
    return 0
