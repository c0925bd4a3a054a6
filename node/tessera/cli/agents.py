"""`tessera agents list|spawn|status|kill`: allow-listed agent runs on the local node.

`list` reads the allow-list from the configuration (no node needed). The others call the
running node's CommandService with the local client certificate: `spawn` executes
`agent.spawn` (an operation), `status` executes `agent.status` (state, exit status, and
pid, pgid and uid while it runs), `kill` executes `agent.kill` (the whole process group:
SIGTERM, then SIGKILL after agents.kill_grace_s) and waits until the run has ended. Each
prints the answer as JSON.

`spawn --target PEER` runs the agent on a joined peer through the local node
(docs/commands.md, "Commands to peers"). `status` and `kill` of such a run go through
the local node too: they read and cancel the relayed operation (GetOperation,
CancelOperation), since the peer's agent.status and agent.kill name the peer's own
operation, which only the local node knows.
"""

from __future__ import annotations

import argparse
import json
import uuid
from typing import Any

import grpc
from google.protobuf import struct_pb2

# An operation's error carries google.rpc details (ErrorInfo...): their types must be
# known to print it as JSON.
from google.rpc import error_details_pb2  # noqa: F401

from tessera.cli._command import Command, Env
from tessera.cli._output import enum_name
from tessera_client.pb import command_pb2


def _list(env: Env) -> int:
    from tessera.commands import parse_agents

    cfg, out = env.cfg, env.out
    specs = parse_agents(cfg.agents, cfg.node.data_dir)
    rows: list[dict[str, Any]] = [
        {"name": s.name, "executable": s.executable, "args": list(s.args),
         "params": list(s.params), "schema": dict(s.schema), "env": list(s.env),
         "cwd": s.cwd, "time_limit_s": s.time_limit_s,
         "output_limit_bytes": s.output_limit_bytes, "max_per_grant": s.max_per_grant,
         "max_per_node": s.max_per_node, "description": s.description}
        for s in specs.values()]
    if out.json:
        out.data({"uid_range": cfg.agents.uid_range, "user": cfg.agents.user,
                  "agents": rows})
        return 0
    if cfg.agents.uid_range.strip():
        out.line(f"agents run as: one uid per run from {cfg.agents.uid_range} (gid = uid)")
    else:
        out.line(f"agents run as: {cfg.agents.user or '(agents.user is not set)'} (one "
                 "shared account: runs are not isolated from each other)")
    for r in rows:
        line = " ".join([r["executable"], *r["args"], "--", *(f"<{p}>" for p in r["params"])])
        out.line(f"{r['name']:16} {line}")
        out.line(f"{'':16} time {r['time_limit_s']:g} s, output {r['output_limit_bytes']} "
                 f"bytes, {r['max_per_grant']} per grant, {r['max_per_node']} per node")
    if not rows:
        out.line("no agents are allowed (add [agents.<name>] tables to the config)")
    return 0


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _spawn_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("agent", help="an allow-listed agent name")
    p.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                   help="a declared argument (VALUE is JSON if it parses, else a string)")
    p.add_argument("--key", default="", help="idempotency key (default: a new one)")
    p.add_argument("--target", default="", metavar="PEER",
                   help="run it on this joined peer, through the local node (under the "
                        "grant the peer gave this node)")
    p.add_argument("--watch", action="store_true",
                   help="stream the agent's output; exit 0 if the run succeeded, else 1")
    p.add_argument("--name-only", action="store_true",
                   help="print only the operation's name (for status and kill)")


def _spawn(env: Env) -> int:
    a, out = env.args, env.out
    values: dict[str, Any] = {}
    for item in a.arg:
        name, sep, text = item.partition("=")
        if not sep or not name:
            out.warn(f"tessera: --arg {item!r}: expected NAME=VALUE")
            return 2
        values[name] = _value(text)
    args = struct_pb2.Struct()
    args.update({"agent": a.agent, "args": values})
    request = command_pb2.ExecuteRequest(
        idempotency_key=a.key or f"agents-cli-{uuid.uuid4()}",
        plugin=command_pb2.PluginCommand(type="agent.spawn", args=args), target=a.target)
    # Operations belong to their caller: spawn, status and kill use one local identity.
    with env.node("client").client() as c:
        op = c.command.Execute(request)
        if a.name_only and not a.watch:
            out.line(op.name)
            return 0
        if not a.watch:
            out.data(op)
            return 0
        out.warn(f"{op.name}")
        last = op
        for msg in c.command.WatchOperation(command_pb2.WatchOperationRequest(name=op.name)):
            if msg.output_chunk:
                out.out.write(msg.output_chunk)
                out.out.flush()
            last = msg
    state = enum_name(command_pb2.OperationState, last.state)
    if last.error.message:
        out.warn(f"tessera: {op.name} {state}: {last.error.message}")
    return 0 if state == "SUCCEEDED" else 1


def _operation_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("operation", help="operations/<uuid>, as spawn printed")


def _on_run(env: Env, command_type: str) -> int:
    """Execute agent.status or agent.kill on one run, wait for its answer, print it."""
    args = struct_pb2.Struct()
    args.update({"operation": env.args.operation})
    request = command_pb2.ExecuteRequest(
        idempotency_key=f"agents-cli-{uuid.uuid4()}",
        plugin=command_pb2.PluginCommand(type=command_type, args=args))
    with env.node("client").client() as c:
        try:
            run = c.command.GetOperation(command_pb2.GetOperationRequest(
                name=env.args.operation))
        except grpc.RpcError:
            run = None  # not the caller's (or not a name): agent.status/kill says so
        if run is not None and run.target:
            return _on_forwarded(env, c, run, command_type)
        op = c.command.Execute(request)
        for msg in c.command.WatchOperation(command_pb2.WatchOperationRequest(name=op.name)):
            op = msg
    if op.state != command_pb2.OPERATION_STATE_SUCCEEDED:
        state = enum_name(command_pb2.OperationState, op.state)
        env.out.warn(f"tessera: {command_type} {op.name} {state}: {op.error.message}")
        return 1
    env.out.data(op.output)
    return 0


def _on_forwarded(env: Env, c: Any, run: command_pb2.Operation, command_type: str) -> int:
    """Status or kill of a run on a peer: its relayed operation (kill waits for its end)."""
    if command_type == "agent.kill" and not run.done:
        c.command.CancelOperation(command_pb2.CancelOperationRequest(name=run.name))
        for msg in c.command.WatchOperation(command_pb2.WatchOperationRequest(name=run.name)):
            run = msg
    env.out.data(run)
    return 0


def _status(env: Env) -> int:
    return _on_run(env, "agent.status")


def _kill(env: Env) -> int:
    return _on_run(env, "agent.kill")


LIST = Command("the allow-list as this configuration defines it", _list, json=True)
SPAWN = Command("start an agent; prints its operation", _spawn, flags=_spawn_flags)
STATUS = Command("show an agent run: state, exit status; pid, pgid, uid while it runs",
                 _status, flags=_operation_flag)
KILL = Command("end an agent run (its whole process group); waits until it ended",
               _kill, flags=_operation_flag)
