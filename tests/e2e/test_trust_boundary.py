"""Regression tests for issue 12, "Trust-boundary hardening: what an attacker found".

Each test reproduces one finding against real node processes (real PostgreSQL, Valkey,
mTLS and sockets on 127.0.0.1) and asserts the behaviour a caller or an operator sees.
"""

from __future__ import annotations

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tessera.peering._token import parse as parse_token
from tessera_client.pb import admin_pb2, admin_pb2_grpc
from tests.fixtures.nodes import NodeFactory
from tests.fixtures.peers import Peering, bad_fields


def csr_with_key(key: ec.EllipticCurvePrivateKey, uri: str) -> bytes:
    """A CSR shaped exactly as `peers join` makes one, but with the given key."""
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                          critical=True)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


# -- item 6: enrolment signs P-256 keys only ----------------------------------------------

async def test_enrolment_refuses_a_csr_whose_key_is_not_p256(
    node_factory: NodeFactory, peering: Peering
) -> None:
    b = node_factory(name="b")
    token = await peering.invite(b, "curvy")
    inv = parse_token(token)
    async with grpc.aio.secure_channel(
        inv.enroll_address, grpc.ssl_channel_credentials(inv.root_pem())
    ) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        for curve in (ec.SECP256K1(), ec.SECP384R1()):
            csr = csr_with_key(ec.generate_private_key(curve), inv.identity)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.EnrollPeer(admin_pb2.EnrollPeerRequest(token=token,
                                                                  csr_pem=csr.decode()))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, curve.name
            assert bad_fields(info.value) == ["csr_pem"]
            assert "P-256" in (info.value.details() or "")
    # Refusing the key did not use up the token: the genuine P-256 join still works.
    joined = await peering.join_dir(token)
    leaf = x509.load_pem_x509_certificates(joined.cert.read_bytes())[0]
    key = leaf.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
