"""`tessera peers invite|join|list|show|suspend|revoke` and `tessera grants ...`.

Every command but `join` calls the running node's AdminService with the local admin
certificate (data_dir/node.json, data_dir/pki/admin.*). Output is JSON, for scripts.
`join` talks to the inviting node only and records the peer under data_dir/peers/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf import duration_pb2, json_format, message, timestamp_pb2

from tessera import config
from tessera.cli._client import local_node
from tessera.core.errors import TesseraError
from tessera.peering import join
from tessera_client import Client
from tessera_client.pb import admin_pb2

Load = Callable[[argparse.Namespace], config.Config]


def _client(cfg: config.Config) -> Client:
    address, creds = local_node(cfg.node.data_dir)
    return Client(address, creds, server_name="localhost")


def _print(msg: message.Message) -> None:
    print(json_format.MessageToJson(msg, preserving_proto_field_name=True, indent=2))


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
        ts = timestamp_pb2.Timestamp()
        ts.FromDatetime(datetime.now(UTC) + timedelta(seconds=a.expires_in_s))
        g.expire_time.CopyFrom(ts)
    return g


def add_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None],
                 load: Load) -> None:
    """Add the `peers` and `grants` command groups."""

    def node_cmd(p: argparse.ArgumentParser,
                 fn: Callable[[Client, argparse.Namespace], message.Message]) -> None:
        common(p)

        def run(args: argparse.Namespace) -> int:
            with _client(load(args)) as client:
                try:
                    _print(fn(client, args))
                except grpc.RpcError as exc:
                    print(f"tessera: {exc.code().name}: {exc.details()}", file=sys.stderr)
                    return 1
            return 0

        p.set_defaults(func=run)

    peers = sub.add_parser("peers", help="invite, join, list, suspend and revoke peers")
    psub = peers.add_subparsers(dest="peers_command", required=True)

    p = psub.add_parser("invite", help="create a peer and print its single-use token")
    p.add_argument("name", help="peer name (1-64 of [a-z0-9-])")
    p.add_argument("--ttl-s", type=int, default=600, help="token lifetime, at most 900 s")
    p.add_argument("--address", default="", help="address the peer should call us at")

    def invite(c: Client, a: argparse.Namespace) -> message.Message:
        ttl = duration_pb2.Duration(seconds=a.ttl_s)
        resp: admin_pb2.InvitePeerResponse = c.admin.InvitePeer(admin_pb2.InvitePeerRequest(
            name=a.name, token_ttl=ttl, advertised_address=a.address))
        return resp

    node_cmd(p, invite)

    p = psub.add_parser("join", help="redeem a token from another node and record that peer")
    common(p)
    p.add_argument("token", help="the token printed by `tessera peers invite` on the peer")
    p.add_argument("--address", default="", help="address the peer may call us back at")
    p.add_argument("--as", dest="local_name", default="",
                   help="record the peer under this local name (default: the name it gives)")
    p.add_argument("--replace", action="store_true",
                   help="deliberately replace a recorded peer of that name (journalled in "
                        "data_dir/peers/joins.jsonl)")

    def run_join(args: argparse.Namespace) -> int:
        cfg = load(args)
        try:
            peer = asyncio.run(join(args.token, cfg.node.data_dir,
                                    callback_address=args.address,
                                    local_name=args.local_name, replace=args.replace))
        except grpc.aio.AioRpcError as exc:
            print(f"tessera: enrolment refused: {exc.code().name}: {exc.details()}",
                  file=sys.stderr)
            return 1
        except TesseraError as exc:
            print(f"tessera: {exc.reason}: {exc}", file=sys.stderr)
            return 1
        print(json.dumps({"name": peer.name, "identity": peer.identity,
                          "address": peer.address, "as_identity": peer.as_identity,
                          "directory": str(peer.directory)}, indent=2))
        return 0

    p.set_defaults(func=run_join)

    p = psub.add_parser("list", help="list peers")
    p.add_argument("--page-size", type=int, default=100)
    node_cmd(p, lambda c, a: c.admin.ListPeers(admin_pb2.ListPeersRequest(page_size=a.page_size)))

    for verb, helptext in (("show", "show one peer"), ("suspend", "refuse a peer's calls"),
                           ("revoke", "revoke a peer and its certificate")):
        p = psub.add_parser(verb, help=helptext)
        p.add_argument("name")
        if verb != "show":
            p.add_argument("--reason", default="")
        node_cmd(p, _peer_verb(verb))

    grants = sub.add_parser("grants", help="create, list, show and revoke grants")
    gsub = grants.add_subparsers(dest="grants_command", required=True)
    p = gsub.add_parser("create", help="grant a peer access (default deny for the rest)")
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
    node_cmd(p, lambda c, a: c.admin.CreateGrant(
        admin_pb2.CreateGrantRequest(grant=_grant_from_args(a))))

    p = gsub.add_parser("list", help="list grants")
    p.add_argument("--peer", default="")
    p.add_argument("--include-revoked", action="store_true")
    node_cmd(p, lambda c, a: c.admin.ListGrants(admin_pb2.ListGrantsRequest(
        peer=a.peer, include_revoked=a.include_revoked)))
    p = gsub.add_parser("show", help="show one grant")
    p.add_argument("name", help="grants/<uuid>")
    node_cmd(p, lambda c, a: c.admin.GetGrant(admin_pb2.GetGrantRequest(name=a.name)))
    p = gsub.add_parser("revoke", help="revoke a grant (effective on the peer's next call)")
    p.add_argument("name", help="grants/<uuid>")
    node_cmd(p, lambda c, a: c.admin.RevokeGrant(admin_pb2.RevokeGrantRequest(name=a.name)))


def _peer_verb(verb: str) -> Callable[[Client, argparse.Namespace], message.Message]:
    def call(c: Client, a: argparse.Namespace) -> message.Message:
        if verb == "show":
            peer: admin_pb2.Peer = c.admin.GetPeer(admin_pb2.GetPeerRequest(name=a.name))
        elif verb == "suspend":
            peer = c.admin.SuspendPeer(admin_pb2.SuspendPeerRequest(name=a.name,
                                                                    reason=a.reason))
        else:
            peer = c.admin.RevokePeer(admin_pb2.RevokePeerRequest(name=a.name, reason=a.reason))
        return peer

    return call
