"""Enrolment: a fresh key and CSR, signed by whichever issuer the node has, stored safely."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from tessera.core.paths import CredentialFiles
from tessera.pki._csr import new_key_and_csr
from tessera.pki._files import write_atomic
from tessera.pki._identity import SpiffeId
from tessera.pki._issuer import IssuedCertificate, Issuer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Enrolment:
    """Who to enrol as, and with which extra SANs."""

    identity: SpiffeId
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()


async def enrol(
    issuer: Issuer,
    files: CredentialFiles,
    enrolment: Enrolment,
    *,
    ttl: timedelta | None = None,
    sans: Sequence[str] | None = None,
) -> IssuedCertificate:
    """Make a P-256 key and CSR, have `issuer` sign it, and store key (0600), chain, roots.

    `sans` (all SANs, the SPIFFE URI among them) overrides the enrolment's DNS and IP
    names, e.g. to match exactly what a bootstrap token authorises.
    """
    dns, ips = list(enrolment.dns_names), list(enrolment.ip_addresses)
    if sans is not None:
        if enrolment.identity.uri not in sans:
            raise ValueError(
                f"the enrolment token does not authorise the identity {enrolment.identity.uri}"
            )
        dns, ips = split_sans(s for s in sans if s != enrolment.identity.uri)
    ident = enrolment.identity
    request = new_key_and_csr(ident, dns, ips)
    issued = await issuer.sign(request.csr_pem, ttl=ttl)
    # Key first, chain second: after a crash in between the pair does not match, and
    # `credentials_valid` sends the node to enrol again instead of serving a mismatch.
    write_atomic(files.key, request.key_pem, private=True)
    write_atomic(files.cert, issued.chain_pem)
    write_atomic(files.ca, issuer.roots_pem())
    log.info("enrolled %s with %s: serial %x, valid until %s", ident.uri, issuer.kind,
             issued.serial, issued.not_after.isoformat())
    return issued


def split_sans(values: Iterable[str]) -> tuple[list[str], list[str]]:
    """Separate DNS names from IP addresses."""
    dns: list[str] = []
    ips: list[str] = []
    for value in values:
        try:
            ips.append(str(ipaddress.ip_address(value)))
        except ValueError:
            dns.append(str(value))
    return dns, ips


def credentials_valid(
    files: CredentialFiles, roots_pem: bytes, *, now: dt.datetime | None = None
) -> bool:
    """True when key and chain exist, match, are unexpired and chain to `roots_pem`."""
    now = now or dt.datetime.now(dt.UTC)
    try:
        chain = x509.load_pem_x509_certificates(files.cert.read_bytes())
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
        roots = x509.load_pem_x509_certificates(roots_pem)
    except (OSError, ValueError, TypeError):
        return False
    leaf = chain[0]
    if leaf.public_key() != key.public_key():
        return False
    if not leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc:
        return False
    try:
        verifier = PolicyBuilder().store(Store(roots)).time(now).build_client_verifier()
        verifier.verify(leaf, chain[1:])
    except (VerificationError, ValueError):
        return False
    return True
