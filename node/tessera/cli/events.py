"""`tessera events tail` and `tessera events publish`, as the local client identity."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import grpc

from tessera.cli._client import local_node
from tessera.config import Config
from tessera.core.errors import ConfigError, Unavailable

#: A durable tail acknowledges after this many printed events (and on every heartbeat).
ACK_EVERY = 100


def add_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None],
                 load: Callable[[argparse.Namespace], Config]) -> None:
    """Register `tessera events ...`."""
    p = sub.add_parser("events", help="follow and publish events of the running node")
    verbs = p.add_subparsers(dest="verb", required=True)

    tail = verbs.add_parser("tail", help="print events as they happen (Ctrl-C to stop)")
    common(tail)
    tail.add_argument("pattern", nargs="*", default=[],
                      help="type patterns such as task.* (default: every type)")
    tail.add_argument("--from", dest="start", default=None, metavar="beginning|now|CURSOR",
                      help="where to start (default: now, or where --durable left off)")
    tail.add_argument("--durable", default="", metavar="NAME",
                      help="a durable subscription: the node keeps its position, acknowledged "
                           "as events are printed")
    tail.add_argument("--limit", type=int, default=0,
                      help="exit after this many events (default: run until interrupted)")
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    tail.add_argument("--address", default=None, help="host:port of the node (default: node.json)")
    tail.set_defaults(func=lambda args: _tail(args, load(args)))

    pub = verbs.add_parser("publish", help="publish one application event")
    common(pub)
    pub.add_argument("type", help="event type in dot notation, e.g. task.done")
    pub.add_argument("--subject", default="", metavar="WORKSPACE/KIND/ID",
                     help="the resource the event concerns")
    pub.add_argument("--data", default="{}", metavar="JSON", help="payload: a JSON object")
    pub.add_argument("--key", default="", help="idempotency key: publishing it again appends once")
    pub.add_argument("--json", action="store_true", help="print the stored event as JSON")
    pub.add_argument("--address", default=None, help="host:port of the node (default: node.json)")
    pub.set_defaults(func=lambda args: _publish(args, load(args)))


def _client(cfg: Config, address: str | None) -> Any:
    from tessera_client import Client

    local_address, creds = local_node(cfg.node.data_dir, who="client")
    return Client(address or local_address, creds, server_name="localhost")


def _rpc_error(what: str, exc: grpc.RpcError) -> Unavailable:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return Unavailable(f"{what} failed: {code.name if code else 'ERROR'}: {details}")


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
        return json.dumps(_plain(json_format.MessageToDict(env)), separators=(",", ":"))
    s = env.subject
    subject = f"{s.workspace}/{s.kind}/{s.id}" if env.HasField("subject") else "-"
    data = json.dumps(_plain(json_format.MessageToDict(env.data)), separators=(",", ":"))
    return (f"{env.sequence:>8} {env.time.ToDatetime().isoformat()}Z {env.type} {subject} "
            f"{data}")


def _tail(args: argparse.Namespace, cfg: Config) -> int:
    from tessera_client.pb import events_pb2

    req = events_pb2.SubscribeRequest(type_patterns=args.pattern, subscription=args.durable)
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
    with _client(cfg, args.address) as c:
        stream = c.events.Subscribe(req)

        def ack() -> None:
            nonlocal unacked
            if args.durable and last_cursor and unacked:
                c.events.Ack(events_pb2.AckRequest(subscription=args.durable,
                                                   cursor=last_cursor), timeout=10)
                unacked = 0

        try:
            for env in stream:
                if env.heartbeat:
                    last_cursor, unacked = env.cursor, unacked or 1
                    ack()
                    continue
                print(_line(env, args.json), flush=True)
                printed += 1
                unacked += 1
                last_cursor = env.cursor
                if unacked >= ACK_EVERY:
                    ack()
                if args.limit and printed >= args.limit:
                    break
        except KeyboardInterrupt:
            pass
        except grpc.RpcError as exc:
            raise _rpc_error("Subscribe", exc) from None
        finally:
            stream.cancel()
            try:
                ack()
            except grpc.RpcError as exc:
                print(f"tessera: the last events were not acknowledged: {exc.code().name}",
                      file=sys.stderr)
    return 0


def _publish(args: argparse.Namespace, cfg: Config) -> int:
    from google.protobuf import json_format

    from tessera_client.pb import events_pb2, resources_pb2

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
    with _client(cfg, args.address) as c:
        try:
            resp = c.events.Publish(req, timeout=10)
        except grpc.RpcError as exc:
            raise _rpc_error("Publish", exc) from None
    if args.json:
        print(json_format.MessageToJson(resp.event))
    else:
        print(f"published {resp.event.type} as sequence {resp.event.sequence} "
              f"(id {resp.event.id}); cursor {resp.event.cursor}")
    return 0
