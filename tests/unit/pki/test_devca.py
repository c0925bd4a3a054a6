"""Unit tests of tessera.pki: devca."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tessera.pki import DevCA
from tests.fixtures.certs import TD, dev_files


def test_needs_reissue_checks_the_signature_and_the_key(tmp_path: Path) -> None:
    from tessera.pki import needs_reissue

    ca, files = dev_files(tmp_path, ttl=dt.timedelta(hours=1))
    assert not needs_reissue(files.cert, files.key, ca_roots_pem=ca.roots_pem())
    # Another root with the very same subject did not issue it.
    twin = DevCA(tmp_path / "twin", TD)
    assert twin.roots_pem() != ca.roots_pem()
    assert needs_reissue(files.cert, files.key, ca_roots_pem=twin.roots_pem())
    # A key that does not belong to the certificate.
    files.key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    assert needs_reissue(files.cert, files.key, ca_roots_pem=ca.roots_pem())
