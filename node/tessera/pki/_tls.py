"""Server TLS credentials that can be swapped in place when certificates rotate."""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes of one identity's chain, key and trusted roots."""

    chain_pem: bytes
    key_pem: bytes
    roots_pem: bytes

    @classmethod
    def read(cls, cert: Path, key: Path, ca: Path) -> TlsMaterial:
        """Read the three files."""
        return cls(cert.read_bytes(), key.read_bytes(), ca.read_bytes())

    def leaf(self) -> x509.Certificate:
        """The leaf certificate."""
        return x509.load_pem_x509_certificates(self.chain_pem)[0]


def expired_placeholder(roots_pem: bytes | None) -> grpc.ServerCertificateConfiguration:
    """A throwaway self-signed certificate that no client trusts.

    Served instead of a certificate past its expiry: gRPC keeps the previous
    configuration when a fetch fails, so the only way not to present an expired
    certificate is to present one that every handshake refuses as untrusted.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tessera certificate expired")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return grpc.ssl_server_certificate_configuration(
        [(key_pem, cert.public_bytes(serialization.Encoding.PEM))], root_certificates=roots_pem)


class ReloadableServerCredentials:
    """mTLS server credentials whose certificate can be replaced while serving.

    gRPC calls the fetcher before each new handshake; established connections and their
    in-flight calls keep the certificate they were made with. A certificate past its
    expiry is never presented: until a renewed one is swapped in, new handshakes get an
    untrusted placeholder and fail.
    """

    def __init__(self, material: TlsMaterial) -> None:
        self._lock = threading.Lock()
        self._current = material
        self._not_after = material.leaf().not_valid_after_utc
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._placeholder_served = False
        self.generation = 0

    @property
    def material(self) -> TlsMaterial:
        """What is being served now (or on the next handshake)."""
        return self._current

    @staticmethod
    def _config(m: TlsMaterial) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(m.key_pem, m.chain_pem)], root_certificates=m.roots_pem
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for `server.add_secure_port`; client certificates are required."""
        return grpc.dynamic_ssl_server_credentials(
            self._config(self._current), self._fetch, require_client_authentication=True
        )

    def swap(self, material: TlsMaterial) -> None:
        """Serve `material` from the next handshake on."""
        config = self._config(material)
        with self._lock:
            self._current = material
            self._not_after = material.leaf().not_valid_after_utc
            self._pending = config
            self.generation += 1

    @property
    def expired(self) -> bool:
        """True when the certificate held now is past its expiry."""
        return dt.datetime.now(dt.UTC) >= self._not_after

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            config, self._pending = self._pending, None
            if config is not None:
                self._placeholder_served = False
            elif self.expired and not self._placeholder_served:
                self._placeholder_served = True
                return expired_placeholder(self._current.roots_pem)
            if config is not None and self.expired:
                # Swapped to material that is already expired: the placeholder instead.
                self._placeholder_served = True
                return expired_placeholder(self._current.roots_pem)
        return config
