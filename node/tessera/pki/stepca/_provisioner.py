"""Loading a JWK provisioner's private key: plain JWK, step's encrypted JWE, or PKCS#8 PEM.

No error message says anything about the key's or the password's content.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

from tessera.core.codec import b64url_decode
from tessera.core.errors import ConfigError
from tessera.pki.stepca._client import _provisioner_key

_PBES2 = {
    "PBES2-HS256+A128KW": (hashes.SHA256(), 16),
    "PBES2-HS384+A192KW": (hashes.SHA384(), 24),
    "PBES2-HS512+A256KW": (hashes.SHA512(), 32),
}


def load_provisioner_key(key_file: Path, password_file: Path | None) -> ec.EllipticCurvePrivateKey:
    """Read the provisioner key; raise ConfigError naming the setting when it is unusable."""
    setting = "ca.provisioner_key_file"
    data = key_file.read_bytes().strip()
    password = password_file.read_bytes().strip() if password_file else None
    try:
        if data.startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(data, password=password)
        else:
            jwk = _jwk_from_text(data, password)
            key = _provisioner_key(jwk)
    except (ValueError, TypeError, KeyError, InvalidUnwrap):
        hint = ("check ca.provisioner_password_file" if password is not None
                else "if it is encrypted set ca.provisioner_password_file")
        raise ConfigError(
            f"{setting}: {key_file} is not a usable P-256 provisioner key; {hint}"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(f"{setting}: {key_file} is not a P-256 EC key")
    return key


def _jwk_from_text(data: bytes, password: bytes | None) -> dict[str, Any]:
    text = data.decode("ascii")
    if text.startswith("{"):
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        if "ciphertext" not in obj:
            return obj
        protected, enc_key = str(obj["protected"]), str(obj.get("encrypted_key", ""))
        iv, ciphertext, tag = str(obj["iv"]), str(obj["ciphertext"]), str(obj["tag"])
    else:
        protected, enc_key, iv, ciphertext, tag = text.split(".")
    if password is None:
        raise ValueError("encrypted")
    return _decrypt_jwe(protected, enc_key, iv, ciphertext, tag, password)


def _decrypt_jwe(protected: str, enc_key: str, iv: str, ciphertext: str, tag: str,
                 password: bytes) -> dict[str, Any]:
    """Decrypt a PBES2 + AES-GCM JWE, the format `step crypto jwk create` writes."""
    header = json.loads(b64url_decode(protected))
    alg = str(header["alg"])
    if alg not in _PBES2 or not str(header.get("enc", "")).endswith("GCM"):
        raise ValueError("unsupported JWE algorithm")
    digest, kek_len = _PBES2[alg]
    # RFC 7518 §4.8.1.1: the salt is the algorithm name, a zero byte, then p2s.
    salt = alg.encode() + b"\0" + b64url_decode(str(header["p2s"]))
    kek = PBKDF2HMAC(digest, kek_len, salt, int(header["p2c"])).derive(password)
    cek = aes_key_unwrap(kek, b64url_decode(enc_key))
    plain = AESGCM(cek).decrypt(b64url_decode(iv),
                                b64url_decode(ciphertext) + b64url_decode(tag),
                                protected.encode())
    obj = json.loads(plain)
    if not isinstance(obj, dict):
        raise ValueError("not a JWK")
    return obj


