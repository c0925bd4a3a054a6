"""Enrolment tokens: the documented text format, and what each malformed token is told.

Tokens live for days and cross upgrades, so the format is pinned here from its
description (not from the encoder). The messages reach the joining operator as the
`token` field violation, so each refusal is checked by its exact text.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from tessera.peering import TokenError, TokenForged, _token

KEY = b"k" * 32
ROOT_PEM = b"""-----BEGIN CERTIFICATE-----
MIIBEjCBuaADAgECAgEBMAoGCCqGSM49BAMCMBMxETAPBgNVBAMMCGthdCByb290
MB4XDTI2MDEwMTAwMDAwMFoXDTI2MDEwMjAwMDAwMFowEzERMA8GA1UEAwwIa2F0
IHJvb3QwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAQFs6puh6703KrVEyW1RZjb
PG8FNTQBg/GYDO20MVMpTsKOD13o2yP7vpj+jwZseTWPEF+ml1CmpOBMK6uhRhXV
MAoGCCqGSM49BAMCA0gAMEUCIDBIjBwcNqObtjBRoMknJMaosqusv77A25FzNAsS
dLwRAiEAkLRlueu4aMfM77yTdgYcbmW837Hyp3SUmzpLwFPb0xA=
-----END CERTIFICATE-----
"""
ROOT_DER = x509.load_pem_x509_certificate(ROOT_PEM).public_bytes(Encoding.DER)
ROOT_FP = "0d377c2a36966c1f494a4eeb7fb56cdfc80b64f989c26b89431b5bd692d8f965"
INV = _token.Invitation(
    uuid.UUID("00112233-4455-6677-8899-aabbccddeeff"), bytes(range(32)), "beta", "a.example",
    "10.0.0.1:7443", "10.0.0.1:7444", ROOT_DER, ROOT_FP, 1_900_000_000, "alpha")

NOT_A_TOKEN = "not an enrolment token (expected tessera-enrol-1.<body>.<mac>)"
NOT_BASE64 = "the enrolment token is not valid base64url"
MALFORMED = "the enrolment token's content is malformed"
BAD_ROOT = "the enrolment token's root certificate is malformed"


def b64(data: bytes) -> str:
    """base64url without padding, as the format says."""
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def signed(body: bytes, key: bytes = KEY) -> str:
    """A token around `body`, MACed as documented: HMAC-SHA256 over a context and the body,
    truncated to 128 bits."""
    mac = hmac.new(key, b"tessera enrolment token\0" + body, hashlib.sha256).digest()[:16]
    return f"tessera-enrol-1.{b64(body)}.{b64(mac)}"


def body_of(**changes: object) -> bytes:
    fields: dict[str, object] = {
        "i": "00112233445566778899aabbccddeeff", "s": b64(bytes(range(32))), "n": "beta",
        "d": "a.example", "a": "10.0.0.1:7443", "e": "10.0.0.1:7444", "r": b64(ROOT_DER),
        "f": ROOT_FP, "x": 1_900_000_000, "b": "alpha",
    }
    fields.update(changes)
    return json.dumps({k: v for k, v in fields.items() if v is not None},
                      separators=(",", ":")).encode()


def test_a_token_is_the_documented_text_and_reads_back_whole() -> None:
    assert _token.fingerprint(ROOT_DER) == ROOT_FP
    token = _token.encode(INV, KEY)
    assert token == signed(body_of())
    assert "=" not in token and token.count(".") == 2
    assert _token.verify(token, KEY) == INV
    assert _token.parse(token) == INV


def test_a_new_invitation_names_the_inviting_node_when_told() -> None:
    made = {"peer": "beta", "trust_domain": "a.example", "address": "10.0.0.1:7443",
            "enroll_address": "10.0.0.1:7444", "root_pem": ROOT_PEM,
            "expire_unix": 1_900_000_000}
    named = _token.new_invitation(**made, node_name="alpha")  # type: ignore[arg-type]
    assert _token.parse(_token.encode(named, KEY)).node_name == "alpha"
    assert (named.root_der, named.root_fingerprint, len(named.secret)) == (ROOT_DER, ROOT_FP, 32)
    unnamed = _token.new_invitation(**made)  # type: ignore[arg-type]
    assert unnamed.node_name == ""
    assert unnamed.token_id != named.token_id and unnamed.secret != named.secret


def test_a_token_from_a_node_that_did_not_send_its_name_still_reads() -> None:
    older = signed(body_of(b=None))
    assert _token.verify(older, KEY) == dataclasses.replace(INV, node_name="")


def test_every_root_travels_byte_for_byte() -> None:
    # ECDSA roots (like the dev CA's) differ in length and final bytes from one signature to
    # the next; deterministic signatures make these 64 the same on every run, and between
    # them they end on every kind of base64 boundary.
    key = ec.derive_private_key(0x7E55E7A, ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "root")])
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for serial in range(1, 65):
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(serial).not_valid_before(start)
                .not_valid_after(start + dt.timedelta(days=1))
                .sign(key, hashes.SHA256(), ecdsa_deterministic=True))
        der = cert.public_bytes(Encoding.DER)
        inv = dataclasses.replace(INV, root_der=der, root_fingerprint=_token.fingerprint(der))
        assert _token.verify(_token.encode(inv, KEY), KEY).root_der == der, serial


def test_a_token_pasted_with_surrounding_whitespace_is_read() -> None:
    token = _token.encode(INV, KEY)
    assert _token.verify(f"  {token}\n", KEY) == INV
    assert _token.parse(f"\t{token}  \r\n") == INV


def refusal(token: str, *, key: bytes | None = KEY) -> tuple[type[TokenError], str]:
    with pytest.raises(TokenError) as err:
        if key is None:
            _token.parse(token)
        else:
            _token.verify(token, key)
    return type(err.value), str(err.value)


def test_text_that_is_not_a_token_says_what_a_token_looks_like() -> None:
    good = signed(body_of())
    _, body, mac = good.split(".")
    for text in ("", "nonsense", f"tessera-enrol-1.{body}", f"{good}.{mac}",
                 # Right shape and a valid MAC, but another format version.
                 f"tessera-enrol-2.{body}.{mac}", f"TESSERA-ENROL-1.{body}.{mac}"):
        assert refusal(text) == (TokenError, NOT_A_TOKEN), text
        assert refusal(text, key=None) == (TokenError, NOT_A_TOKEN), text


def test_a_body_or_mac_that_is_not_base64url_is_named() -> None:
    _, body, mac = signed(body_of()).split(".")
    for text in (f"tessera-enrol-1.A.{mac}", f"tessera-enrol-1.{body}.A"):
        assert refusal(text) == (TokenError, NOT_BASE64)
    assert refusal(f"tessera-enrol-1.A.{mac}", key=None) == (TokenError, NOT_BASE64)


def test_a_token_from_another_key_is_forged_not_malformed() -> None:
    assert refusal(signed(body_of()), key=b"x" * 32) == (
        TokenForged, "the enrolment token was not issued by this node")


@pytest.mark.parametrize("body", [
    b"not json",
    b"[]",
    body_of(i=None),
    body_of(i="not-a-uuid"),
    body_of(s="A"),
    body_of(x="soon"),
    body_of(x=None),
    body_of(r=None),
], ids=["not-json", "not-an-object", "no-id", "bad-id", "bad-secret-b64", "bad-expiry",
        "no-expiry", "no-root"])
def test_a_signed_token_with_unreadable_content_is_malformed(body: bytes) -> None:
    # The MAC is right, so only the content check can refuse it.
    assert refusal(signed(body)) == (TokenError, MALFORMED)
    assert refusal(signed(body), key=None) == (TokenError, MALFORMED)


def test_a_secret_of_the_wrong_length_is_refused_even_when_signed() -> None:
    for secret in (bytes(31), bytes(33), b""):
        token = _token.encode(dataclasses.replace(INV, secret=secret), KEY)
        assert refusal(token) == (TokenError, MALFORMED), len(secret)


def test_a_root_that_does_not_match_its_fingerprint_is_refused() -> None:
    other = hashlib.sha256(b"another root").hexdigest()
    assert refusal(signed(body_of(f=other))) == (TokenError, MALFORMED)
    assert refusal(signed(body_of(r=b64(ROOT_DER[:-1])))) == (TokenError, MALFORMED)


def test_the_fingerprint_may_be_written_in_upper_case() -> None:
    assert _token.verify(signed(body_of(f=ROOT_FP.upper())), KEY).root_der == ROOT_DER


def test_bytes_that_match_their_fingerprint_but_are_no_certificate_are_refused() -> None:
    junk = b"\x30\x03\x02\x01\x01"  # DER, but an INTEGER sequence, not a certificate
    body = body_of(r=b64(junk), f=hashlib.sha256(junk).hexdigest())
    assert refusal(signed(body)) == (TokenError, BAD_ROOT)
    assert refusal(signed(body), key=None) == (TokenError, BAD_ROOT)
