"""`tessera events tail` and `tessera events publish`, as the local client identity."""

from __future__ import annotations

import argparse
import json
from typing import Any

import grpc

from tessera.cli._command import Command, Env
from tessera.cli._output import rfc3339, to_json
from tessera.core.errors import ConfigError

#: A durable tail acknowledges after this many printed events (and on every heartbeat).
ACK_EVERY = 100


def _plain(value: Any) -> Any:
    """JSON numbers arrive as doubles (protobuf Struct): print 2, not 2.0."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _line(env: Any, as_json: bool) -> str:
    from google.protobuf import json_format

    if as_json:
        return json.dumps(_plain(to_json(env)), separators=(",", ":"))
    s = env.subject
    subject = f"{s.workspace}/{s.kind}/{s.id}" if env.HasField("subject") else "-"
    data = json.dumps(_plain(json_format.MessageToDict(env.data)), separators=(",", ":"))
    return f"{env.sequence:>8} {rfc3339(env.time.ToDatetime())} {env.type} {subject} {data}"


def _tail_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="*", default=[],
                   help="type patterns such as task.* (default: every type)")
    p.add_argument("--from", dest="start", default=None, metavar="beginning|now|CURSOR",
                   help="where to start (default: now, or where --durable left off)")
    p.add_argument("--durable", default="", metavar="NAME",
                   help="a durable subscription: the node keeps its position, acknowledged "
                        "as events are printed")
    p.add_argument("--limit", type=int, default=0,
                   help="exit after this many events (default: run until interrupted)")
    p.add_argument("--origin", action="append", default=[], metavar="local|PEER|*",
                   help="only events of this origin: local (default), a followed peer's "
                        "name, or * for all; repeatable")


def _tail(env: Env) -> int:
    from tessera_client.pb import events_pb2

    args, out = env.args, env.out
    req = events_pb2.SubscribeRequest(type_patterns=args.pattern, subscription=args.durable,
                                      origins=args.origin)
    if args.start in (None, ""):
        req.start = events_pb2.START_POSITION_UNSPECIFIED
    elif args.start == "beginning":
        req.start = events_pb2.START_POSITION_BEGINNING
    elif args.start == "now":
        req.start = events_pb2.START_POSITION_NOW
    else:
        req.start = events_pb2.START_POSITION_CURSOR
        req.cursor = args.start
    if args.limit < 0:
        raise ConfigError("--limit: must be 0 (no limit) or positive")
    printed = unacked = 0
    last_cursor = ""
    with env.node("client").client() as c:
        stream = c.events.Subscribe(req)

        def ack() -> None:
            nonlocal unacked
            if args.durable and last_cursor and unacked:
                c.events.Ack(events_pb2.AckRequest(subscription=args.durable,
                                                   cursor=last_cursor), timeout=10)
                unacked = 0

        try:
            for event in stream:
                if event.heartbeat:
                    last_cursor, unacked = event.cursor, unacked or 1
                    ack()
                    continue
                out.line(_line(event, out.json), flush=True)
                printed += 1
                unacked += 1
                last_cursor = event.cursor
                if unacked >= ACK_EVERY:
                    ack()
                if args.limit and printed >= args.limit:
                    break
        except KeyboardInterrupt:
            pass
        finally:
            stream.cancel()
            try:
                ack()
            except grpc.RpcError as exc:
                out.warn(f"tessera: the last events were not acknowledged: {exc.code().name}")
    return 0


def _publish_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("type", help="event type in dot notation, e.g. task.done")
    p.add_argument("--subject", default="", metavar="WORKSPACE/KIND/ID",
                   help="the resource the event concerns")
    p.add_argument("--data", default="{}", metavar="JSON", help="payload: a JSON object")
    p.add_argument("--key", default="", help="idempotency key: publishing it again appends once")


def _publish(env: Env) -> int:
    from tessera_client.pb import events_pb2, resources_pb2

    args, out = env.args, env.out
    try:
        data = json.loads(args.data)
    except ValueError as exc:
        raise ConfigError(f"--data: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError("--data: must be a JSON object, e.g. '{\"ok\": true}'")
    req = events_pb2.PublishRequest(type=args.type, idempotency_key=args.key)
    req.data.update(data)
    if args.subject:
        parts = args.subject.split("/")
        if len(parts) != 3 or not all(parts):
            raise ConfigError("--subject: must be WORKSPACE/KIND/ID, e.g. acme/task/t1")
        req.subject.CopyFrom(resources_pb2.ResourceKey(
            workspace=parts[0], kind=parts[1], id=parts[2]))
    with env.node("client").client() as c:
        ev = c.events.Publish(req, timeout=10).event
    out.result(ev, lambda: out.line(f"published {ev.type} as sequence {ev.sequence} "
                                    f"(id {ev.id}); cursor {ev.cursor}"))
    return 0


TAIL = Command("print events as they happen (Ctrl-C to stop)", _tail, flags=_tail_flags,
               json=True, address=True, json_help="one JSON object per line")
PUBLISH = Command("publish one application event", _publish, flags=_publish_flags, json=True,
                  address=True, json_help="print the stored event as JSON")
