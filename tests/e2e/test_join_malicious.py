"""`peers join` against an inviting node that answers EnrollPeer with what it likes.

The inviting node is a real gRPC server over TLS in this process, serving a token it made
itself (a joiner cannot check the MAC); what it sends back is scripted per test.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tessera.core.errors import FailedPrecondition
from tessera.peering import join
from tessera.peering._token import encode, new_invitation
from tessera_client.pb import admin_pb2, admin_pb2_grpc, resources_pb2

Answer = Callable[[admin_pb2.EnrollPeerRequest], admin_pb2.EnrollPeerResponse]


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Inviter:
    """A TLS server answering EnrollPeer with `answer`, and a token pointing at it."""

    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    token: str
    answer: Answer

    def sign(self, request: admin_pb2.EnrollPeerRequest, *, san: bool = True) -> str:
        """A certificate for the CSR's key (with its URI SAN unless `san` is False)."""
        csr = x509.load_pem_x509_csr(request.csr_pem.encode())
        now = dt.datetime.now(dt.UTC)
        b = (x509.CertificateBuilder().subject_name(x509.Name([]))
             .issuer_name(self.root.subject).public_key(csr.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=1))
             .not_valid_after(now + dt.timedelta(hours=1)))
        if san:
            b = b.add_extension(
                csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value,
                critical=True)
        return _pem(b.sign(self.root_key, hashes.SHA256())).decode()


class _Servicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, inviter: list[Inviter]) -> None:
        self.inviter = inviter

    async def EnrollPeer(self, request: admin_pb2.EnrollPeerRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.EnrollPeerResponse:
        return self.inviter[0].answer(request)


@pytest.fixture
async def inviter() -> AsyncIterator[Inviter]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mallory root")])
    root = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    box: list[Inviter] = []
    server = grpc.aio.server()
    admin_pb2_grpc.add_AdminServiceServicer_to_server(_Servicer(box), server)  # type: ignore[abstract]
    port = server.add_secure_port("127.0.0.1:0",
                                  grpc.ssl_server_credentials([(key_pem, _pem(root))]))
    await server.start()
    inv = new_invitation(peer="victim", trust_domain="mallory.example",
                         address=f"127.0.0.1:{port}", enroll_address=f"127.0.0.1:{port}",
                         root_pem=_pem(root), expire_unix=int(time.time()) + 600,
                         node_name="mallory")
    box.append(Inviter(key, root, encode(inv, b"k" * 32),
                       lambda r: admin_pb2.EnrollPeerResponse()))
    try:
        yield box[0]
    finally:
        await server.stop(None)


def _node() -> resources_pb2.Identity:
    return resources_pb2.Identity(uri="spiffe://mallory.example/node/mallory",
                                  trust_domain="mallory.example", name="mallory",
                                  kind=resources_pb2.Identity.KIND_NODE)


@pytest.mark.parametrize("chain", ["", "not a certificate", "nosan"])
async def test_join_refuses_a_certificate_chain_it_cannot_read(
    inviter: Inviter, tmp_path: Path, chain: str
) -> None:
    # An empty or unreadable chain, or a leaf without SANs, raised IndexError, ValueError
    # or ExtensionNotFound out of `peers join` (a traceback), not a refusal.
    def answer(request: admin_pb2.EnrollPeerRequest) -> admin_pb2.EnrollPeerResponse:
        pem = inviter.sign(request, san=False) if chain == "nosan" else chain
        return admin_pb2.EnrollPeerResponse(certificate_chain_pem=pem, node=_node())

    inviter.answer = answer
    with pytest.raises(FailedPrecondition) as err:
        await join(inviter.token, tmp_path)
    assert err.value.reason == "ENROLMENT_MISMATCH"
    assert not (tmp_path / "peers" / "mallory").exists()


async def test_a_well_behaved_inviter_is_joined(inviter: Inviter, tmp_path: Path) -> None:
    # The harness itself: the same server answering properly is joined.
    inviter.answer = lambda r: admin_pb2.EnrollPeerResponse(
        certificate_chain_pem=inviter.sign(r), node=_node())
    peer = await join(inviter.token, tmp_path)
    assert peer.name == "mallory" and peer.ca.read_bytes() == _pem(inviter.root)


@pytest.mark.parametrize("name", ["alice", "../alice", "joins.jsonl", "ALICE", ""])
async def test_an_unnamed_token_cannot_steer_the_join_onto_a_recorded_peer(
    inviter: Inviter, tmp_path: Path, name: str
) -> None:
    # A token without a node name (as older nodes issue them): the name in the answer
    # decides where the files go, so it must never land on, or beside, a recorded peer.
    from tessera.peering._token import parse

    inv = parse(inviter.token)
    inviter.token = encode(new_invitation(
        peer=inv.peer, trust_domain=inv.trust_domain, address=inv.address,
        enroll_address=inv.enroll_address, root_pem=inv.root_pem(),
        expire_unix=inv.expire_unix), b"k" * 32)
    alice = tmp_path / "peers" / "alice"
    alice.mkdir(parents=True)
    (alice / "peer.json").write_text('{"name": "alice"}')
    before = sorted(p.name for p in (tmp_path / "peers").rglob("*"))
    node = _node()
    node.name = name
    inviter.answer = lambda r: admin_pb2.EnrollPeerResponse(
        certificate_chain_pem=inviter.sign(r), node=node)
    with pytest.raises(FailedPrecondition) as err:
        await join(inviter.token, tmp_path)
    assert err.value.reason in ("PEER_EXISTS", "PEER_NAME_INVALID")
    assert sorted(p.name for p in (tmp_path / "peers").rglob("*")) == before
    assert (alice / "peer.json").read_text() == '{"name": "alice"}'
