"""SPIFFE identities: `spiffe://<trust-domain>/<kind>/<name>`, parsed from certificates."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from cryptography import x509

from tessera.core.errors import Unauthenticated

_DOMAIN = r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?"
_NAME = r"[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?"
_SPIFFE_RE = re.compile(
    rf"spiffe://(?P<domain>{_DOMAIN})/(?P<kind>node|client|admin)/(?P<name>{_NAME})"
)


class IdentityKind(enum.StrEnum):
    """What an identity is allowed to be."""

    NODE = "node"
    CLIENT = "client"
    ADMIN = "admin"


@dataclass(frozen=True)
class SpiffeId:
    """A parsed identity."""

    trust_domain: str
    kind: IdentityKind
    name: str

    @property
    def uri(self) -> str:
        """The identity as a URI."""
        return f"spiffe://{self.trust_domain}/{self.kind.value}/{self.name}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse a URI; raises ValueError when it is not a Tessera identity."""
        # fullmatch: "$" would also accept a trailing newline.
        m = _SPIFFE_RE.fullmatch(uri)
        if m is None:
            raise ValueError(
                f"not a spiffe://<trust-domain>/<node|client|admin>/<name> URI: {uri!r}"
            )
        return cls(m["domain"], IdentityKind(m["kind"]), m["name"])


@dataclass(frozen=True)
class PeerCertificate:
    """What the node knows of a verified client certificate."""

    identity: SpiffeId
    serial: int
    fingerprint_sha256: str
    #: Validity window; checked on every call because a connection outlives its handshake.
    not_before: datetime
    not_after: datetime


@lru_cache(maxsize=4096)
def identity_from_pem(pem: bytes) -> PeerCertificate:
    """Read the single SPIFFE URI SAN of a (TLS-verified) PEM leaf certificate.

    Cached: a connection presents the same certificate on every call.
    Raises Unauthenticated unless there is exactly one URI SAN and it is a valid identity.
    """
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise Unauthenticated("the client certificate could not be parsed") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        raise Unauthenticated(
            f"the client certificate must carry exactly one spiffe:// URI SAN, it has {len(uris)}",
            reason="IDENTITY_SAN_COUNT",
        )
    try:
        identity = SpiffeId.parse(uris[0])
    except ValueError:
        raise Unauthenticated(
            "the client certificate's URI SAN is not spiffe://<trust-domain>/<kind>/<name>",
            reason="IDENTITY_SAN_INVALID",
        ) from None
    from cryptography.hazmat.primitives import hashes

    return PeerCertificate(identity, cert.serial_number, cert.fingerprint(hashes.SHA256()).hex(),
                           cert.not_valid_before_utc, cert.not_valid_after_utc)
