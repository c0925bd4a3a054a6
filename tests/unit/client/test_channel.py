"""The client's credential follower: new files are taken only as a matching pair."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tessera_client import Credentials
from tessera_client._channel import _Follower


def _pair(name: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(hours=1))
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)  # as the node's atomic writes do: a new inode each time


def test_follower_takes_a_renewed_pair_and_skips_a_half_written_one(tmp_path: Path) -> None:
    ca, cert, key = tmp_path / "ca.crt", tmp_path / "c.crt", tmp_path / "c.key"
    first_cert, first_key = _pair("first")
    for path, data in ((ca, first_cert), (cert, first_cert), (key, first_key)):
        _write(path, data)
    follower = _Follower(Credentials.from_files(ca, cert, key), interval_s=0)
    assert follower.changed() is None  # nothing changed yet

    second_cert, second_key = _pair("second")
    _write(cert, second_cert)  # the certificate is renamed first: pair does not match
    assert follower.changed() is None
    assert follower.creds.cert_pem == first_cert

    _write(key, second_key)  # now it does
    fresh = follower.changed()
    assert fresh is not None
    assert (fresh.cert_pem, fresh.key_pem) == (second_cert, second_key)
    assert follower.changed() is None


def test_credentials_from_bytes_follow_nothing(tmp_path: Path) -> None:
    cert, key = _pair("fixed")
    follower = _Follower(Credentials(cert, cert, key), interval_s=0)
    assert follower.changed() is None
    assert "PRIVATE" not in repr(Credentials(cert, cert, key))
