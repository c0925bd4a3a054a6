"""An enrolment token's MAC covers every byte of the body and is compared in full."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from tessera.core.codec import b64url_decode, b64url_encode
from tessera.peering import TokenForged, _token

KEY = b"k" * 32


def _root_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "root")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(Encoding.PEM)






@pytest.fixture(scope="module")
def token() -> str:
    inv = _token.new_invitation(peer="a", trust_domain="b.example", address="127.0.0.1:1",
                                enroll_address="127.0.0.1:2", root_pem=_root_pem(),
                                expire_unix=2_000_000_000)
    return _token.encode(inv, KEY)


def _parts(token: str) -> tuple[str, bytes, bytes]:
    prefix, body, mac = token.split(".")
    return prefix, b64url_decode(body), b64url_decode(mac)


def test_the_untouched_token_verifies(token: str) -> None:
    assert _token.verify(token, KEY).peer == "a"


def test_flipping_any_byte_of_the_mac_is_refused(token: str) -> None:
    prefix, body, mac = _parts(token)
    for i in range(len(mac)):
        for flip in (0x01, 0x80, 0xFF):
            edited = bytearray(mac)
            edited[i] ^= flip
            forged = f"{prefix}.{b64url_encode(body)}.{b64url_encode(bytes(edited))}"
            with pytest.raises(TokenForged):
                _token.verify(forged, KEY)


def test_flipping_any_byte_of_the_body_is_refused(token: str) -> None:
    prefix, body, mac = _parts(token)
    for i in range(len(body)):
        edited = bytearray(body)
        edited[i] ^= 0x01
        forged = f"{prefix}.{b64url_encode(bytes(edited))}.{b64url_encode(mac)}"
        with pytest.raises(TokenForged):
            _token.verify(forged, KEY)


def test_a_shortened_or_lengthened_mac_is_refused(token: str) -> None:
    prefix, body, mac = _parts(token)
    for edited in (mac[:4], mac[:-1], mac + b"\0", b""):
        with pytest.raises(TokenForged):
            _token.verify(f"{prefix}.{b64url_encode(body)}.{b64url_encode(edited)}", KEY)
