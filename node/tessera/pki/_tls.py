"""Server TLS credentials that can be swapped in place when certificates rotate."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509


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


class ReloadableServerCredentials:
    """mTLS server credentials whose certificate can be replaced while serving.

    gRPC calls the fetcher before each new handshake; established connections and their
    in-flight calls keep the certificate they were made with.
    """

    def __init__(self, material: TlsMaterial) -> None:
        self._lock = threading.Lock()
        self._current = material
        self._pending: grpc.ServerCertificateConfiguration | None = None
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
            self._pending = config
            self.generation += 1

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            config, self._pending = self._pending, None
        return config
