"""Enrolment tokens: pure encoding, parsing and checking. No I/O.

A token is `tessera-enrol-1.<body>.<mac>` (base64url). The body carries what the joining
node needs to reach the inviting node safely — its addresses, trust domain, the invited
peer name and the inviting node's root with its SHA-256 fingerprint, so the joining node
pins TLS to that root without any unauthenticated fetch — plus the token id and a random
secret. The inviting node stores only a hash of the secret, and MACs the body with a
node key so an edited token is refused before the database is asked.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import uuid
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tessera.core.codec import b64url_decode, b64url_encode

PREFIX = "tessera-enrol-1"
_MAC_CONTEXT = b"tessera enrolment token\0"


class TokenError(ValueError):
    """The token is not a well-formed enrolment token."""


class TokenForged(TokenError):
    """The token is well formed but its MAC is not this node's: edited or made up."""


def secret_hash(secret: bytes) -> bytes:
    """What is stored of a token's secret."""
    return hashlib.sha256(secret).digest()


def fingerprint(root_der: bytes) -> str:
    """Hex SHA-256 of a certificate's DER."""
    return hashlib.sha256(root_der).hexdigest()


@dataclass(frozen=True)
class Invitation:
    """The content of an enrolment token."""

    token_id: uuid.UUID
    secret: bytes
    peer: str
    trust_domain: str
    #: The inviting node's mTLS address (for calls after enrolment).
    address: str
    #: Its server-authenticated enrolment address.
    enroll_address: str
    root_der: bytes
    root_fingerprint: str
    expire_unix: int
    #: The inviting node's own name ('' in tokens from nodes that did not send it): the
    #: joining node checks it against its recorded peers before the token is spent.
    node_name: str = ""

    @property
    def identity(self) -> str:
        """The identity the joining node will have on the inviting node."""
        return f"spiffe://{self.trust_domain}/node/{self.peer}"

    def root_pem(self) -> bytes:
        """The pinned root as PEM."""
        return x509.load_der_x509_certificate(self.root_der).public_bytes(
            serialization.Encoding.PEM)


def new_invitation(
    *, peer: str, trust_domain: str, address: str, enroll_address: str, root_pem: bytes,
    expire_unix: int, node_name: str = "",
) -> Invitation:
    """A fresh invitation with a random id and a 256-bit secret."""
    root = x509.load_pem_x509_certificate(root_pem)
    der = root.public_bytes(serialization.Encoding.DER)
    return Invitation(uuid.uuid4(), secrets.token_bytes(32), peer, trust_domain, address,
                      enroll_address, der, root.fingerprint(hashes.SHA256()).hex(),
                      expire_unix, node_name)


def encode(inv: Invitation, key: bytes) -> str:
    """The token text, MACed with the inviting node's key."""
    body = json.dumps({
        "i": inv.token_id.hex, "s": b64url_encode(inv.secret), "n": inv.peer, "d": inv.trust_domain,
        "a": inv.address, "e": inv.enroll_address, "r": b64url_encode(inv.root_der),
        "f": inv.root_fingerprint, "x": inv.expire_unix, "b": inv.node_name,
    }, separators=(",", ":")).encode()
    return f"{PREFIX}.{b64url_encode(body)}.{b64url_encode(_mac(key, body))}"


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, _MAC_CONTEXT + body, hashlib.sha256).digest()[:16]


def _split(token: str) -> tuple[bytes, bytes]:
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise TokenError(f"not an enrolment token (expected {PREFIX}.<body>.<mac>)")
    try:
        return b64url_decode(parts[1]), b64url_decode(parts[2])
    except ValueError:
        raise TokenError("the enrolment token is not valid base64url") from None


def parse(token: str) -> Invitation:
    """Read a token without checking its MAC (the joining node has no key).

    The joining node still checks that the root in the token has the fingerprint the
    token names, so a damaged copy fails here rather than at the TLS handshake.
    """
    body, _ = _split(token)
    try:
        d = json.loads(body)
        inv = Invitation(
            uuid.UUID(hex=d["i"]), b64url_decode(d["s"]), str(d["n"]), str(d["d"]), str(d["a"]),
            str(d["e"]), b64url_decode(d["r"]), str(d["f"]), int(d["x"]), str(d.get("b", "")),
        )
    except (ValueError, KeyError, TypeError):
        raise TokenError("the enrolment token's content is malformed") from None
    if len(inv.secret) != 32 or fingerprint(inv.root_der) != inv.root_fingerprint.lower():
        raise TokenError("the enrolment token's content is malformed")
    try:
        x509.load_der_x509_certificate(inv.root_der)
    except ValueError:
        raise TokenError("the enrolment token's root certificate is malformed") from None
    return inv


def verify(token: str, key: bytes) -> Invitation:
    """Parse a token and check it was issued by the node holding `key`."""
    body, mac = _split(token)
    if not hmac.compare_digest(mac, _mac(key, body)):
        raise TokenForged("the enrolment token was not issued by this node")
    return parse(token)
