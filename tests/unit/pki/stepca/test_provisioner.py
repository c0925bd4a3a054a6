"""Unit tests of tessera.pki.stepca: provisioner."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from tessera.core.codec import b64url_encode
from tessera.core.errors import ConfigError
from tessera.pki.stepca._config import private_jwk_from_key
from tessera.pki.stepca._provisioner import load_provisioner_key


def _jwe(plaintext: bytes, password: bytes) -> str:
    """PBES2-HS256+A128KW / A256GCM compact JWE, as `step crypto jwk create` writes."""
    salt = os.urandom(16)
    header = {"alg": "PBES2-HS256+A128KW", "enc": "A256GCM", "cty": "jwk+json",
              "p2s": b64url_encode(salt), "p2c": 1000}
    protected = b64url_encode(json.dumps(header).encode())
    kek = PBKDF2HMAC(hashes.SHA256(), 16, b"PBES2-HS256+A128KW\0" + salt, 1000).derive(password)
    cek, iv = os.urandom(32), os.urandom(12)
    sealed = AESGCM(cek).encrypt(iv, plaintext, protected.encode())
    return ".".join([protected, b64url_encode(aes_key_wrap(kek, cek)), b64url_encode(iv),
                     b64url_encode(sealed[:-16]), b64url_encode(sealed[-16:])])


def test_provisioner_key_loads_from_jwk_encrypted_jwe_and_pem(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    want = key.private_numbers().private_value
    password = b"correct horse battery staple"
    pw = tmp_path / "pw"
    pw.write_bytes(password + b"\n")
    plain = tmp_path / "k.json"
    plain.write_text(json.dumps(private_jwk_from_key(key)))
    jwe = tmp_path / "k.jwe"
    jwe.write_text(_jwe(json.dumps(private_jwk_from_key(key)).encode(), password))
    pem = tmp_path / "k.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.BestAvailableEncryption(password)))
    assert load_provisioner_key(plain, None).private_numbers().private_value == want
    assert load_provisioner_key(jwe, pw).private_numbers().private_value == want
    assert load_provisioner_key(pem, pw).private_numbers().private_value == want


def test_wrong_provisioner_password_fails_without_echoing_it(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwe = tmp_path / "k.jwe"
    jwe.write_text(_jwe(json.dumps(private_jwk_from_key(key)).encode(), b"right-password"))
    pw = tmp_path / "pw"
    pw.write_text("wrong-password-123")
    with pytest.raises(ConfigError) as info:
        load_provisioner_key(jwe, pw)
    assert info.value.message.startswith("ca.provisioner_key_file:")
    assert "wrong-password-123" not in info.value.message
