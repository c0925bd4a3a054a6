"""`tessera ratelimit show <subject>`, and the running node's limiter check for `doctor`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import grpc

from tessera import doctor
from tessera.cli._client import local_node
from tessera.config import Config
from tessera.core.errors import Unavailable

_LEVELS = {1: doctor.Level.GREEN, 2: doctor.Level.YELLOW, 3: doctor.Level.RED}


def add_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None],
                 load: Callable[[argparse.Namespace], Config]) -> None:
    """Register `tessera ratelimit ...`."""
    p = sub.add_parser("ratelimit", help="rate limits of the running node")
    verbs = p.add_subparsers(dest="verb", required=True)
    show = verbs.add_parser("show", help="effective limits and recent rejections of a subject")
    common(show)
    show.add_argument("subject", help="grant name (grants/<id>) or local identity URI")
    show.add_argument("--address", default=None, help="host:port of the node (default: node.json)")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=lambda args: _show(args, load(args)))


def _client(cfg: Config, address: str | None) -> Any:
    from tessera_client import Client

    local_address, creds = local_node(cfg.node.data_dir)
    return Client(address or local_address, creds, server_name="localhost")


def _show(args: argparse.Namespace, cfg: Config) -> int:
    from google.protobuf import json_format

    from tessera_client.pb import admin_pb2

    with _client(cfg, args.address) as c:
        try:
            st = c.admin.GetRateLimitStatus(
                admin_pb2.GetRateLimitStatusRequest(subject=args.subject), timeout=10)
        except grpc.RpcError as exc:
            raise Unavailable(f"GetRateLimitStatus failed: {exc.code().name}: "
                              f"{exc.details()}") from None
    if args.json:
        print(json_format.MessageToJson(st, always_print_fields_with_no_presence=True))
        return 0
    print(f"subject:  {st.subject}")
    print(f"enabled:  {'yes' if st.enabled else 'no'}")
    print(f"backend:  {st.backend}")
    window = st.recent_window.seconds
    print(f"{'class':8} {'rate/s':>9} {'burst':>6}  {'source':13} "
          f"{f'rejected ({window // 60} min)':>18}  last rejection")
    for lim in st.limits:
        rate = "unlimited" if lim.limit.rate_per_s <= 0 else f"{lim.limit.rate_per_s:g}"
        last = (lim.last_rejection_time.ToDatetime().isoformat() + "Z"
                if lim.HasField("last_rejection_time") else "-")
        print(f"{lim.method_class:8} {rate:>9} {lim.limit.burst:>6}  {lim.source:13} "
              f"{lim.recent_rejections:>18}  {last}")
    return 0


def node_checks(cfg: Config) -> list[doctor.Check]:
    """The running node's own rate-limiter check (which backend decides), if it runs."""
    from tessera_client.pb import admin_pb2

    try:
        client = _client(cfg, None)
    except (Unavailable, OSError, KeyError):
        return []  # no node running: nothing to say about its limiter
    with client as c:
        try:
            resp = c.admin.Doctor(admin_pb2.DoctorRequest(), timeout=5)
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.UNAVAILABLE:
                # E.g. its PostgreSQL is down: the node says why in its answer.
                return [doctor.Check("node", doctor.Level.RED,
                                     f"the running node answers UNAVAILABLE: {exc.details()}")]
            return []
    return [doctor.Check(ch.name, _LEVELS.get(ch.status, doctor.Level.RED), ch.message,
                         {"backend": ch.details.fields["backend"].string_value}
                         if "backend" in ch.details.fields else {})
            for ch in resp.checks if ch.name == "ratelimit"]
