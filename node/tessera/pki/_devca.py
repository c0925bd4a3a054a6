"""The embedded tier's development CA: a local root under the data directory.

It implements the same `Issuer` interface as step-ca, so the node does not know which one
it has. Not for production: its root key sits on the node's disk (mode 0600).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tessera.core.paths import CredentialFiles
from tessera.pki._csr import new_key_and_csr
from tessera.pki._files import write_atomic
from tessera.pki._identity import SpiffeId
from tessera.pki._issuer import IssuedCertificate


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _priv_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class DevCA:
    """A local CA: root key and certificate in `directory`, created on first use."""

    kind = "dev-ca"

    def __init__(self, directory: Path, trust_domain: str) -> None:
        self.directory = directory
        self.trust_domain = trust_domain
        self.root_cert_path = directory / "root.crt"
        self.root_key_path = directory / "root.key"
        self.revoked_path = directory / "revoked.txt"
        if not self.root_cert_path.exists() or not self.root_key_path.exists():
            self._create_root()
        key = serialization.load_pem_private_key(self.root_key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{self.root_key_path} is not an EC key")
        self._key = key
        self._cert = x509.load_pem_x509_certificate(self.root_cert_path.read_bytes())

    def _create_root(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tessera development CA"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{self.trust_domain} dev root"),
        ])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        write_atomic(self.root_key_path, _priv_pem(key), private=True)
        write_atomic(self.root_cert_path, cert.public_bytes(serialization.Encoding.PEM))

    def roots_pem(self) -> bytes:
        """The root certificate."""
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def fingerprint_sha256(self) -> str:
        """Hex SHA-256 of the root's DER, for pinning."""
        return self._cert.fingerprint(hashes.SHA256()).hex()

    async def sign(self, csr_pem: bytes, *, ttl: timedelta | None = None) -> IssuedCertificate:
        """Sign a CSR, copying its SANs; the caller has authorised them."""
        return self.sign_sync(csr_pem, ttl=ttl or timedelta(hours=24))

    def sign_sync(self, csr_pem: bytes, *, ttl: timedelta) -> IssuedCertificate:
        """Synchronous `sign`, for start-up before the event loop serves calls."""
        csr = x509.load_pem_x509_csr(csr_pem)
        if not csr.is_signature_valid:
            raise ValueError("CSR signature does not verify")
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        pub = csr.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey) or \
                not isinstance(pub.curve, ec.SECP256R1):
            raise ValueError("only P-256 keys are accepted")
        now = _now()
        # Only a certificate naming a host (DNS or IP SAN) may serve; identities without
        # one (admins, clients, peers) get clientAuth alone, so none can pose as a server.
        host_named = bool(san.get_values_for_type(x509.DNSName)
                          or san.get_values_for_type(x509.IPAddress))
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if host_named:
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        cert = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(self._cert.subject)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(san, critical=len(csr.subject) == 0)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return IssuedCertificate.from_chain(cert.public_bytes(serialization.Encoding.PEM))

    async def renew(self, chain_pem: bytes, key_pem: bytes) -> IssuedCertificate:
        """Issue a new certificate for the same key and SANs."""
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
        if str(leaf.serial_number) in self._revoked():
            raise PermissionError("certificate is revoked")
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("only EC keys are accepted")
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(leaf.subject)
            .add_extension(san, critical=False)
            .sign(key, hashes.SHA256())
        )
        return self.sign_sync(csr.public_bytes(serialization.Encoding.PEM), ttl=lifetime)

    async def revoke(self, serial: int, *, reason: str = "") -> None:
        """Record a serial as revoked (the node's deny list enforces it)."""
        revoked = self._revoked() | {str(serial)}
        write_atomic(self.revoked_path, ("\n".join(sorted(revoked)) + "\n").encode())

    def _revoked(self) -> set[str]:
        if not self.revoked_path.exists():
            return set()
        return {s for s in self.revoked_path.read_text().split() if s}

    def issue_files(
        self,
        files: CredentialFiles,
        identity: SpiffeId,
        *,
        ttl: timedelta,
        dns_names: tuple[str, ...] = (),
        ip_addresses: tuple[str, ...] = (),
    ) -> IssuedCertificate:
        """Make a key, have it signed, and write key (0600), chain and roots."""
        kc = new_key_and_csr(identity, dns_names, ip_addresses)
        issued = self.sign_sync(kc.csr_pem, ttl=ttl)
        write_atomic(files.key, kc.key_pem, private=True)
        write_atomic(files.cert, issued.chain_pem)
        write_atomic(files.ca, self.roots_pem())
        return issued


def needs_reissue(cert_path: Path, key_path: Path, *, ca_roots_pem: bytes) -> bool:
    """True when the files are missing, do not match, are not signed by the root, or are
    past 2/3 of their lifetime."""
    if not cert_path.exists() or not key_path.exists():
        return True
    try:
        leaf = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
        root = x509.load_pem_x509_certificate(ca_roots_pem)
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError):
        return True
    # A root re-created with the same name has the same subject: only the signature
    # tells whether this root issued the leaf.
    try:
        leaf.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        return True
    # After a crash between writing the key and the chain they may not belong together.
    if leaf.public_key() != key.public_key():
        return True
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    return _now() >= leaf.not_valid_before_utc + lifetime * 2 / 3


def local_sans(listen_host: str, node_name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """DNS and IP SANs for a node's server certificate."""
    dns = {"localhost", node_name}
    ips = {"127.0.0.1", "::1"}
    try:
        ip = ipaddress.ip_address(listen_host.strip("[]"))
        if not ip.is_unspecified:
            ips.add(str(ip))
    except ValueError:
        if listen_host:
            dns.add(listen_host)
    return tuple(sorted(dns)), tuple(sorted(ips))

