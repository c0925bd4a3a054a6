"""The interface every certificate issuer implements (development CA, step-ca)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from cryptography import x509


@dataclass(frozen=True)
class IssuedCertificate:
    """A signed certificate chain, leaf first."""

    chain_pem: bytes
    serial: int
    not_before: datetime
    not_after: datetime

    @classmethod
    def from_chain(cls, chain_pem: bytes) -> IssuedCertificate:
        """Build from a PEM chain whose first certificate is the leaf."""
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
        return cls(chain_pem, leaf.serial_number, leaf.not_valid_before_utc,
                   leaf.not_valid_after_utc)

    @property
    def certificate(self) -> x509.Certificate:
        """The parsed leaf."""
        return x509.load_pem_x509_certificates(self.chain_pem)[0]

    @property
    def uris(self) -> list[str]:
        """URI SANs of the leaf (the SPIFFE ID among them)."""
        try:
            san = self.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            return []
        return list(san.value.get_values_for_type(x509.UniformResourceIdentifier))


class Issuer(Protocol):
    """Signs, renews and revokes certificates. The rest of the node knows only this."""

    #: "dev-ca" or "step-ca".
    kind: str

    async def sign(self, csr_pem: bytes, *, ttl: timedelta | None = None) -> IssuedCertificate:
        """Sign a CSR whose SANs the caller has already authorised."""
        ...

    async def renew(self, chain_pem: bytes, key_pem: bytes) -> IssuedCertificate:
        """Renew a still-valid certificate, proving possession of its key."""
        ...

    async def revoke(self, serial: int, *, reason: str = "") -> None:
        """Revoke a certificate by serial."""
        ...

    def roots_pem(self) -> bytes:
        """PEM roots that certificates of this issuer chain to."""
        ...
