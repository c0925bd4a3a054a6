"""Keys and certificate signing requests for node, client and admin identities."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tessera.pki._identity import SpiffeId

#: The longest common name RFC 5280 allows (ub-common-name).
MAX_CN_LEN = 64


@dataclass(frozen=True)
class KeyAndCsr:
    """A fresh P-256 key (PKCS#8 PEM, unencrypted: store it at 0600) and its CSR, with the
    step-ca token `sub` and `sans` that match the CSR exactly."""

    key_pem: bytes = field(repr=False)
    csr_pem: bytes = field(repr=False)
    identity: SpiffeId
    #: The identity's name (the CSR's common name, if it has one): the token's `sub`.
    subject: str
    #: SPIFFE URI, DNS names and IPs, in the CSR's order: the token's `sans`.
    sans: tuple[str, ...]


def new_key_and_csr(
    identity: SpiffeId, dns_names: Iterable[str] = (), ip_addresses: Iterable[str] = (),
    *, common_name: bool = True,
) -> KeyAndCsr:
    """Make a P-256 key and a CSR carrying the SPIFFE URI SAN and the DNS/IP SANs.

    The common name is the bare identity name (step-ca requires it to equal the token's
    `sub`); a name longer than RFC 5280 allows in a CN is left to the URI SAN alone.
    `common_name=False` leaves the subject empty: peers ask for client certificates that
    way, so no CN can ever be matched as a host name by a client's CN fallback.
    """
    dns = [d.strip().lower() for d in dns_names]
    ips = [ipaddress.ip_address(a) for a in ip_addresses]
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    sans += [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ip) for ip in ips]
    with_cn = common_name and len(identity.name) <= MAX_CN_LEN
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, identity.name)] if with_cn else []))
        # RFC 5280: with an empty subject the SAN extension must be critical.
        .add_extension(x509.SubjectAlternativeName(sans), critical=not with_cn)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return KeyAndCsr(key_pem, csr.public_bytes(serialization.Encoding.PEM), identity,
                     identity.name, (identity.uri, *dns, *(str(ip) for ip in ips)))
