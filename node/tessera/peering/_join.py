"""Peering on the joining node: redeem a token, keep the credentials to call the peer."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tessera.core.errors import FailedPrecondition, FieldViolation, InvalidArgument, Unavailable
from tessera.peering import _token
from tessera.pki import IdentityKind, SpiffeId, new_key_and_csr, write_atomic
from tessera_client import AsyncClient, Credentials
from tessera_client.pb import admin_pb2, admin_pb2_grpc

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


async def join(token: str, data_dir: Path, *, callback_address: str = "") -> OutboundPeer:
    """Enrol with the node that issued `token` and store the credentials to call it.

    The enrolment call is pinned to the root carried in the token (whose fingerprint the
    token names) and presents no client certificate; the token is the credential.
    """
    try:
        inv = _token.parse(token)
    except _token.TokenError as exc:
        raise InvalidArgument([FieldViolation("token", str(exc))]) from None
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
    name = resp.node.name or inv.peer
    # The name comes from the other node: it must not steer where files are written.
    if not _NAME_RE.fullmatch(name):
        raise FailedPrecondition(f"the peer answered with an invalid node name {name!r}",
                                 reason="PEER_NAME_INVALID")
    if resp.node.trust_domain and resp.node.trust_domain != inv.trust_domain:
        raise FailedPrecondition("the peer answered with an identity from another trust "
                                 "domain than its token names", reason="PEER_IDENTITY_MISMATCH")
    directory = peers_dir(data_dir) / name
    if directory.resolve().parent != peers_dir(data_dir).resolve():
        raise FailedPrecondition(f"refusing to write peer files outside {peers_dir(data_dir)}",
                                 reason="PEER_NAME_INVALID")
    write_atomic(directory / "client.key", kc.key_pem, private=True)
    write_atomic(directory / "client.crt", chain)
    write_atomic(directory / "ca.crt", inv.root_pem())
    record = {"name": name, "identity": resp.node.uri, "address": inv.address,
              "as_identity": identity.uri, "root_fingerprint": inv.root_fingerprint}
    write_atomic(directory / "peer.json", json.dumps(record, indent=2).encode())
    return OutboundPeer(name, resp.node.uri, inv.address, identity.uri, directory)


def _check_issued(chain_pem: bytes, key_pem: bytes, uri: str) -> None:
    """The signed certificate is for our key and our identity, or we keep nothing."""
    leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    key = serialization.load_pem_private_key(key_pem, password=None)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    if leaf.public_key() != key.public_key() or \
            san.get_values_for_type(x509.UniformResourceIdentifier) != [uri]:
        raise FailedPrecondition("the peer returned a certificate for another key or identity",
                                 reason="ENROLMENT_MISMATCH")
