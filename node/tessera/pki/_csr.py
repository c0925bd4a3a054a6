"""Keys and certificate signing requests for node, client and admin identities."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tessera.pki._identity import SpiffeId


@dataclass(frozen=True)
class KeyAndCsr:
    """A fresh P-256 key (PKCS#8 PEM, unencrypted: store it at 0600) and its CSR."""

    key_pem: bytes
    csr_pem: bytes


def new_key_and_csr(
    identity: SpiffeId, dns_names: Sequence[str] = (), ip_addresses: Sequence[str] = (),
    *, common_name: bool = True,
) -> KeyAndCsr:
    """Make a P-256 key and a CSR carrying the SPIFFE URI SAN and the DNS/IP SANs.

    `common_name=False` leaves the subject empty: peers ask for client certificates that
    way, so no CN can ever be matched as a host name by a client's CN fallback.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    sans += [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, identity.name)] if common_name else []))
        # RFC 5280: with an empty subject the SAN extension must be critical.
        .add_extension(x509.SubjectAlternativeName(sans), critical=not common_name)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return KeyAndCsr(key_pem, csr.public_bytes(serialization.Encoding.PEM))
