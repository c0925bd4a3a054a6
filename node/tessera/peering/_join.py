"""Peering on the joining node: redeem a token, keep the credentials to call the peer."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from tessera.core.errors import FailedPrecondition, FieldViolation, InvalidArgument, Unavailable
from tessera.peering import _token
from tessera.pki import IdentityKind, SpiffeId, new_key_and_csr, write_atomic
from tessera_client import AsyncClient, Credentials
from tessera_client.pb import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)

#: Peer names as InvitePeer accepts them.
_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?")
#: Seconds the enrolment call may take.
ENROLL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class OutboundPeer:
    """A node this node can call, with the files under data_dir/peers/<name>/."""

    name: str
    identity: str
    address: str
    #: This node's identity on the peer.
    as_identity: str
    directory: Path

    @property
    def cert(self) -> Path:
        """Client certificate chain the peer signed."""
        return self.directory / "client.crt"

    @property
    def key(self) -> Path:
        """Its private key (0600)."""
        return self.directory / "client.key"

    @property
    def ca(self) -> Path:
        """The peer's root, pinned at enrolment."""
        return self.directory / "ca.crt"

    def credentials(self) -> Credentials:
        """Client credentials for calling the peer."""
        return Credentials.from_files(self.ca, self.cert, self.key)

    def client(self) -> AsyncClient:
        """An mTLS client to the peer."""
        return AsyncClient(self.address, self.credentials())


def peers_dir(data_dir: Path) -> Path:
    """Where outbound peers live."""
    return data_dir / "peers"


def load_outbound(data_dir: Path, name: str) -> OutboundPeer:
    """An outbound peer recorded by `join`."""
    directory = peers_dir(data_dir) / name
    try:
        d = json.loads((directory / "peer.json").read_text())
    except FileNotFoundError:
        raise FailedPrecondition(f"no peer {name!r} under {peers_dir(data_dir)}; join it first",
                                 reason="PEER_UNKNOWN") from None
    return OutboundPeer(d["name"], d["identity"], d["address"], d["as_identity"], directory)


def journal_path(data_dir: Path) -> Path:
    """The append-only record of every join and deliberate replacement (JSON lines)."""
    return peers_dir(data_dir) / "joins.jsonl"


def _record(data_dir: Path, event: dict[str, Any]) -> None:
    """Append one event to the join journal and make it durable before going on."""
    path = journal_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": datetime.now(UTC).isoformat(), **event},
                      separators=(",", ":")) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_name(data_dir: Path, name: str, *, replace: bool, chosen: bool) -> Path:
    """The directory for peer `name`, refusing a name that would land on an existing peer."""
    if not _NAME_RE.fullmatch(name):
        what = "--as name" if chosen else "the peer answered with an invalid node name"
        raise FailedPrecondition(f"{what} {name!r} is not 1-64 of [a-z0-9-]",
                                 reason="PEER_NAME_INVALID")
    directory = peers_dir(data_dir) / name
    if directory.resolve().parent != peers_dir(data_dir).resolve():
        raise FailedPrecondition(f"refusing to write peer files outside {peers_dir(data_dir)}",
                                 reason="PEER_NAME_INVALID")
    if not replace and directory.exists():
        raise FailedPrecondition(
            f"a peer named {name!r} is already recorded under {peers_dir(data_dir)}; join "
            "under another local name with --as NAME, or --replace it deliberately",
            reason="PEER_EXISTS")
    return directory


async def join(token: str, data_dir: Path, *, callback_address: str = "",
               local_name: str = "", replace: bool = False) -> OutboundPeer:
    """Enrol with the node that issued `token` and store the credentials to call it.

    The enrolment call is pinned to the root carried in the token (whose fingerprint the
    token names) and presents no client certificate; the token is the credential.

    The peer is recorded under `local_name`, or else the name the other node gives. An
    existing peer is never overwritten unless `replace` (each replacement is journalled,
    with what it replaced): otherwise a node answering with a recorded peer's name would
    swap that peer's certificate, pinned root and address for its own.
    """
    try:
        inv = _token.parse(token)
    except _token.TokenError as exc:
        raise InvalidArgument([FieldViolation("token", str(exc))]) from None
    # Refuse before the token is spent when the name is already known.
    if local_name or inv.node_name:
        _check_name(data_dir, local_name or inv.node_name, replace=replace,
                    chosen=bool(local_name))
    identity = SpiffeId(inv.trust_domain, IdentityKind.NODE, inv.peer)
    kc = new_key_and_csr(identity, common_name=False)
    creds = grpc.ssl_channel_credentials(root_certificates=inv.root_pem())
    async with grpc.aio.secure_channel(inv.enroll_address, creds) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        try:
            resp = await stub.EnrollPeer(
                admin_pb2.EnrollPeerRequest(token=token, csr_pem=kc.csr_pem.decode(),
                                            address=callback_address),
                timeout=ENROLL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(
                    f"cannot reach {inv.enroll_address} for enrolment: {exc.details()}"
                ) from None
            raise
    chain = resp.certificate_chain_pem.encode()
    _check_issued(chain, kc.key_pem, identity.uri)
    if resp.node.trust_domain and resp.node.trust_domain != inv.trust_domain:
        raise FailedPrecondition("the peer answered with an identity from another trust "
                                 "domain than its token names", reason="PEER_IDENTITY_MISMATCH")
    if inv.node_name and resp.node.name and resp.node.name != inv.node_name:
        raise FailedPrecondition("the peer answered with another node name than its token "
                                 "names", reason="PEER_IDENTITY_MISMATCH")
    # The name comes from the other node unless chosen here: it must steer neither where
    # files are written nor which recorded peer they replace.
    name = local_name or resp.node.name
    directory = _check_name(data_dir, name, replace=replace, chosen=bool(local_name))
    record = {"name": name, "identity": resp.node.uri, "address": inv.address,
              "as_identity": identity.uri, "root_fingerprint": inv.root_fingerprint}
    previous: dict[str, Any] | None = None
    if directory.exists():  # only with replace=True
        try:
            previous = json.loads((directory / "peer.json").read_text())
        except (OSError, ValueError):
            previous = {}
    _record(data_dir, {"event": "replace" if previous is not None else "join",
                       "peer": record, "replaced": previous})
    if previous is not None:
        log.warning("peer %s replaced by a deliberate re-join (was %s, now %s)", name,
                    previous.get("identity", "?"), resp.node.uri)
    write_atomic(directory / "client.key", kc.key_pem, private=True)
    write_atomic(directory / "client.crt", chain)
    write_atomic(directory / "ca.crt", inv.root_pem())
    write_atomic(directory / "peer.json", json.dumps(record, indent=2).encode())
    return OutboundPeer(name, resp.node.uri, inv.address, identity.uri, directory)


def _check_issued(chain_pem: bytes, key_pem: bytes, uri: str) -> None:
    """The signed certificate is for our key and our identity, or we keep nothing."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    try:
        # The other node chose these bytes: an empty or unreadable chain is a refusal too.
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        same_key = leaf.public_key() == key.public_key()
    except (ValueError, IndexError, x509.ExtensionNotFound, x509.DuplicateExtension,
            UnsupportedAlgorithm):
        same_key, uris = False, []
    if not same_key or uris != [uri]:
        raise FailedPrecondition("the peer returned a certificate for another key or identity",
                                 reason="ENROLMENT_MISMATCH")
