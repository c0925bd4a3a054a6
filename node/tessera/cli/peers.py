"""`tessera peers invite|join|list|show|suspend|revoke|follow|unfollow|forget`.

Every command but `join` calls the running node's AdminService with the local admin
certificate (data_dir/node.json, data_dir/pki/admin.*). Output is JSON, for scripts.
`join` talks to the inviting node only and records the peer under data_dir/peers/.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import grpc
from google.protobuf import duration_pb2

from tessera.cli._client import node_state
from tessera.cli._command import Command, Env
from tessera.cli._output import Column, enum_name, human_when
from tessera.core.errors import TesseraError
from tessera.peering import join
from tessera_client.pb import admin_pb2


def _invite_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="peer name (1-64 of [a-z0-9-])")
    p.add_argument("--ttl-s", type=int, default=600, help="token lifetime, at most 900 s")
    p.add_argument("--address", default="", help="address the peer should call us at")


def _invite(env: Env) -> int:
    a = env.args
    with env.node().client() as c:
        env.out.data(c.admin.InvitePeer(admin_pb2.InvitePeerRequest(
            name=a.name, token_ttl=duration_pb2.Duration(seconds=a.ttl_s),
            advertised_address=a.address)))
    return 0


def _join_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("token", help="the token printed by `tessera peers invite` on the peer")
    p.add_argument("--address", default="", help="address the peer may call us back at")
    p.add_argument("--as", dest="local_name", default="",
                   help="record the peer under this local name (default: the name it gives)")
    p.add_argument("--replace", action="store_true",
                   help="deliberately replace a recorded peer of that name (journalled in "
                        "data_dir/peers/joins.jsonl)")


def _join(env: Env) -> int:
    a = env.args
    try:
        # The token is single-use: spend it only for a node that can use the peer.
        node_state(env.data_dir)
    except TesseraError as exc:
        env.out.warn(f"tessera: {exc.message}\ntessera: the token was not used; it stays "
                     "valid until it expires")
        return 1
    try:
        peer = asyncio.run(join(a.token, env.data_dir, callback_address=a.address,
                                local_name=a.local_name, replace=a.replace))
    except grpc.aio.AioRpcError as exc:
        env.out.warn(f"tessera: enrolment refused: {exc.code().name}: {exc.details()}")
        return 1
    except TesseraError as exc:
        env.out.warn(f"tessera: {exc.reason}: {exc}")
        return 1
    env.out.data({"name": peer.name, "identity": peer.identity, "address": peer.address,
                  "as_identity": peer.as_identity, "directory": peer.directory})
    return 0


def _list_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--page-size", type=int, default=100)


def _list(env: Env) -> int:
    with env.node().client() as c:
        resp = c.admin.ListPeers(admin_pb2.ListPeersRequest(page_size=env.args.page_size))
    env.out.result(resp, lambda: _list_tables(env, resp))
    return 0


def _list_tables(env: Env, resp: admin_pb2.ListPeersResponse) -> None:
    """Both directions: who calls this node, and whom this node has joined."""
    out = env.out
    out.line("Peers that call this node (invited here):")
    if resp.peers:
        out.table([{
            "name": p.name, "state": enum_name(admin_pb2.PeerState, p.state),
            "identity": p.identity.uri, "expires": human_when(p.certificate_expire_time),
            "since": human_when(p.create_time), "reason": p.state_reason,
        } for p in resp.peers], _INBOUND)
    else:
        out.line("  (none: `tessera peers invite NAME` creates one)")
    out.line("")
    out.line("Peers this node has joined (calls out to):")
    if resp.joined:
        out.table([{
            "name": j.name, "address": j.address, "as": j.as_identity,
            "expires": human_when(j.certificate_expire_time), "renewal": j.renewal_state,
            "error": j.last_error,
        } for j in resp.joined], _OUTBOUND)
    else:
        out.line("  (none: `tessera peers join TOKEN` joins one)")
    if resp.next_page_token:
        out.warn("more inbound peers than --page-size; raise it to see them all")


_INBOUND = (Column("NAME", "name"), Column("STATE", "state"), Column("IDENTITY", "identity"),
            Column("CERT EXPIRES", "expires"), Column("SINCE", "since"),
            Column("REASON", "reason"))
_OUTBOUND = (Column("NAME", "name"), Column("ADDRESS", "address"), Column("AS", "as"),
             Column("CERT EXPIRES", "expires"), Column("RENEWAL", "renewal"),
             Column("LAST ERROR", "error"))


def _name_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")


def _name_reason_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    p.add_argument("--reason", default="")


def _show(env: Env) -> int:
    with env.node().client() as c:
        env.out.data(c.admin.GetPeer(admin_pb2.GetPeerRequest(name=env.args.name)))
    return 0


def _suspend(env: Env) -> int:
    return _with_reason(env, "SuspendPeer", admin_pb2.SuspendPeerRequest)


def _revoke(env: Env) -> int:
    return _with_reason(env, "RevokePeer", admin_pb2.RevokePeerRequest)


def _with_reason(env: Env, rpc: str, request: Any) -> int:
    """Suspend or revoke: AdminService.<rpc>(name, reason); prints the peer."""
    with env.node().client() as c:
        env.out.data(getattr(c.admin, rpc)(request(name=env.args.name, reason=env.args.reason)))
    return 0


INVITE = Command("create a peer and print its single-use token", _invite, flags=_invite_flags)
JOIN = Command("redeem a token from another node and record that peer", _join,
               flags=_join_flags)
LIST = Command("list the peers that call this node and those it has joined", _list,
               flags=_list_flags, json=True)
SHOW = Command("show one peer", _show, flags=_name_flag)
SUSPEND = Command("refuse a peer's calls", _suspend, flags=_name_reason_flags)
REVOKE = Command("revoke a peer and its certificate", _revoke, flags=_name_reason_flags)


# -- following a joined peer's events (issue 14) -------------------------------------------


def _follow_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="a joined peer's name (data_dir/peers/NAME)")
    p.add_argument("--types", default="",
                   help="comma-separated type patterns, e.g. task.*,note.* (default: every "
                        "type the peer's grant allows)")


def _follow(env: Env) -> int:
    a = env.args
    types = [t.strip() for t in a.types.split(",") if t.strip()]
    with env.node().client() as c:
        env.out.data(c.admin.FollowPeer(admin_pb2.FollowPeerRequest(name=a.name,
                                                                    type_patterns=types)))
    return 0


def _unfollow(env: Env) -> int:
    with env.node().client() as c:
        env.out.data(c.admin.UnfollowPeer(admin_pb2.UnfollowPeerRequest(name=env.args.name)))
    return 0


def _forget(env: Env) -> int:
    with env.node().client() as c:
        env.out.data(c.admin.ForgetPeer(admin_pb2.ForgetPeerRequest(name=env.args.name)))
    return 0


FOLLOW = Command("follow a joined peer's events (local subscribers see them with origin "
                 "NAME; never shared with other peers)", _follow, flags=_follow_flags)
UNFOLLOW = Command("stop following a peer (its events and cursor stay)", _unfollow,
                   flags=_name_flag)
FORGET = Command("delete every event received from a peer (unfollow it first)", _forget,
                 flags=_name_flag)
