"""Unit tests of tessera.peering: token."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from tessera.peering import TokenError, TokenForged, _token


def _root_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test root")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


ROOT = _root_pem()


KEY = b"k" * 32


def _invitation() -> _token.Invitation:
    return _token.new_invitation(peer="a", trust_domain="b.example", address="127.0.0.1:1",
                                 enroll_address="127.0.0.1:2", root_pem=ROOT,
                                 expire_unix=2_000_000_000)


def test_tokens_round_trip_and_carry_the_pinned_root() -> None:
    inv = _invitation()
    text = _token.encode(inv, KEY)
    assert _token.verify(text, KEY) == inv
    assert _token.parse(text).root_pem() == ROOT
    assert inv.identity == "spiffe://b.example/node/a"
    assert _token.secret_hash(inv.secret) != inv.secret


@given(st.integers(0, 200), st.integers(0, 255))
def test_any_edit_to_a_token_is_refused(position: int, value: int) -> None:
    text = _token.encode(_invitation(), KEY)
    body_start = len(_token.PREFIX) + 1
    i = body_start + position % (len(text) - body_start)
    replacement = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[value % 64]
    edited = text[:i] + replacement + text[i + 1:]
    if edited == text:
        return
    try:
        _token.verify(edited, KEY)
    except TokenError:
        return
    # base64url can map an edited last character to the same bytes; then nothing changed.
    assert _token.verify(edited, KEY) == _token.verify(text, KEY)


def test_a_token_from_another_node_or_malformed_is_refused() -> None:
    text = _token.encode(_invitation(), KEY)
    with pytest.raises(TokenForged):
        _token.verify(text, b"x" * 32)
    for bad in ("", "nonsense", f"{_token.PREFIX}.@@@.@@@", "other.a.b"):
        with pytest.raises(TokenError):
            _token.verify(bad, KEY)
