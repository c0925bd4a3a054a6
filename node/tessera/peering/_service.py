"""Peering on the inviting node: invitations, enrolment, suspension and revocation."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from tessera.core.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
)
from tessera.grants import GrantStore, Peer, PeerState
from tessera.peering import _token
from tessera.pki import IdentityKind, Issuer, SpiffeId

log = logging.getLogger(__name__)

#: Key types a peer's CSR may carry: P-256 always; Ed25519 only where the issuer signs it
#: (step-ca does, the development CA does not). Anything else (secp256k1, P-384, RSA...)
#: is refused before the issuer sees the CSR.
KEY_P256 = "p256"
KEY_ED25519 = "ed25519"
_ISSUER_KEYS = {"step-ca": frozenset({KEY_P256, KEY_ED25519})}

#: Token lifetimes: the default, and the most an admin may ask for.
DEFAULT_TOKEN_TTL = timedelta(minutes=10)
MAX_TOKEN_TTL = timedelta(minutes=15)


@dataclass(frozen=True)
class Invited:
    """The answer of an invitation: the peer and its one-time token (shown once)."""

    peer: Peer
    token: str
    expire_time: datetime


@dataclass(frozen=True)
class Enrolled:
    """The answer of an enrolment."""

    chain_pem: bytes
    roots_pem: bytes
    peer: Peer


def token_key(page_token_secret: bytes) -> bytes:
    """The MAC key of enrolment tokens, derived from the node secret (domain-separated)."""
    return hmac.new(page_token_secret, b"tessera enrolment token key", hashlib.sha256).digest()


class Peering:
    """Invites and enrols peers; suspends and revokes them."""

    def __init__(
        self, *, grants: GrantStore, node: SpiffeId, key: bytes, roots_pem: Callable[[], bytes],
        issuer: Callable[[], Issuer | None], deny: Callable[[int], None],
        address: Callable[[], str], enroll_address: Callable[[], str],
        peer_cert_ttl: timedelta | None,
    ) -> None:
        self.grants = grants
        self.node = node
        self.key = key
        self._roots_pem = roots_pem
        self._issuer = issuer
        self._deny = deny
        self._address = address
        self._enroll_address = enroll_address
        self.peer_cert_ttl = peer_cert_ttl

    def identity_of(self, name: str) -> SpiffeId:
        """The identity a peer of this name calls with."""
        return SpiffeId(self.node.trust_domain, IdentityKind.NODE, name)

    async def invite(self, name: str, *, ttl: timedelta, address: str = "") -> Invited:
        """Create an INVITED peer and a single-use token carrying how to reach us."""
        if name == self.node.name:
            raise FailedPrecondition(f"{name!r} is this node's own name; choose another",
                                     reason="PEER_EXISTS")
        enroll_address = self._enroll_address()
        if not enroll_address:
            raise FailedPrecondition("the enrolment listener is not running",
                                     reason="ENROLMENT_UNAVAILABLE")
        expire = datetime.now(UTC) + ttl
        inv = _token.new_invitation(
            peer=name, trust_domain=self.node.trust_domain,
            address=address or self._address(), enroll_address=enroll_address,
            root_pem=self._roots_pem(), expire_unix=int(expire.timestamp()),
            node_name=self.node.name,
        )
        peer = await self.grants.create_invitation(
            name=name, identity=self.identity_of(name).uri, token_id=inv.token_id,
            secret_hash=_token.secret_hash(inv.secret), expire_time=expire,
        )
        log.info("invited peer %s (token expires %s)", name, expire.isoformat())
        return Invited(peer, _token.encode(inv, self.key), expire)

    def token_verifies(self, token: str) -> bool:
        """Whether a token is well formed and MACed by this node (no database, no clock).

        Only attempts passing this are audited one by one; the rest are counted and
        limited per source (see `FloodGuard`), since anyone can send them for free.
        """
        try:
            _token.verify(token, self.key)
        except _token.TokenError:
            return False
        return True

    async def enroll(self, token: str, csr_pem: bytes, address: str) -> Enrolled:
        """Redeem a token: check it, check the CSR names the invited identity, sign it."""
        try:
            inv = _token.verify(token, self.key)
        except _token.TokenForged:
            raise Unauthenticated("the enrolment token is not valid",
                                  reason="TOKEN_INVALID") from None
        except _token.TokenError as exc:
            raise InvalidArgument([FieldViolation("token", str(exc))]) from None
        stored_hash, peer_name, expired, used = await self.grants.token(inv.token_id)
        if not hmac.compare_digest(stored_hash, _token.secret_hash(inv.secret)):
            raise Unauthenticated("the enrolment token is not valid", reason="TOKEN_INVALID")
        if used:
            raise PermissionDenied("the enrolment token was already used; ask for a new one",
                                   reason="TOKEN_USED")
        if expired:
            raise Unauthenticated("the enrolment token has expired; ask for a new one",
                                  reason="TOKEN_EXPIRED")
        identity = self.identity_of(peer_name)
        issuer = self._issuer()
        if issuer is None:
            raise FailedPrecondition("this node has no certificate issuer to sign peers with",
                                     reason="NO_ISSUER")
        check_csr(csr_pem, identity, key_types=issuer_key_types(issuer.kind))
        try:
            issued = await issuer.sign(csr_pem, ttl=self.peer_cert_ttl)
        except ValueError as exc:  # e.g. a key type this issuer does not sign
            raise InvalidArgument([FieldViolation("csr_pem", str(exc))]) from None
        try:
            peer = await self.grants.redeem(inv.token_id, serial_hex=format(issued.serial, "x"),
                                            address=address, not_after=issued.not_after)
        except PermissionDenied:
            # Lost a race with another redemption (or the peer was revoked meanwhile):
            # the certificate just signed must never work.
            self._deny(issued.serial)
            await issuer.revoke(issued.serial, reason="enrolment token already used")
            raise
        log.info("enrolled peer %s (certificate serial %x)", peer.name, issued.serial)
        return Enrolled(issued.chain_pem, self._roots_pem(), peer)

    async def renew(self, *, peer: str, presented_serial: int, csr_pem: bytes) -> Enrolled:
        """Sign a new client certificate for an admitted peer calling with its current one.

        The call path has already checked the caller's certificate (TLS, trust domain, deny
        list, validity), that the peer is ACTIVE and that its grant is live. Here: the CSR
        names exactly the same identity with a P-256 key, and the certificate presented is
        the one last issued (or the one before, when the answer to a renewal was lost).
        """
        identity = self.identity_of(peer)
        check_csr(csr_pem, identity)  # P-256 only: the key this node's peers make
        issuer = self._issuer()
        if issuer is None:
            raise FailedPrecondition("this node has no certificate issuer to sign peers with",
                                     reason="NO_ISSUER")
        presented = format(presented_serial, "x")
        try:
            issued = await issuer.sign(csr_pem, ttl=self.peer_cert_ttl)
        except ValueError as exc:
            raise InvalidArgument([FieldViolation("csr_pem", str(exc))]) from None
        recorded = await self.grants.renew_certificate(
            peer, presented_hex=presented, serial_hex=format(issued.serial, "x"),
            not_after=issued.not_after)
        if recorded is None:
            # Revoked or suspended meanwhile, or an old certificate: what was just signed
            # must never work.
            self._deny(issued.serial)
            await self._revoke_quietly(issued.serial, "renewal refused")
            raise PermissionDenied(
                f"peer {peer} may not renew: it is no longer active, or serial {presented} "
                "is not its current certificate", reason="PEER_CERT_NOT_CURRENT")
        updated, replaced = recorded
        if replaced and replaced not in (presented, format(issued.serial, "x")):
            # The answer for `replaced` never reached the peer: nobody may use it.
            self._deny(int(replaced, 16))
            await self._revoke_quietly(int(replaced, 16), "superseded before delivery")
        log.info("renewed the certificate of peer %s: serial %s -> %x, valid until %s",
                 updated.name, presented, issued.serial, issued.not_after.isoformat())
        return Enrolled(issued.chain_pem, self._roots_pem(), updated)

    async def _revoke_quietly(self, serial: int, reason: str) -> None:
        issuer = self._issuer()
        if issuer is None:
            return
        try:
            await issuer.revoke(serial, reason=reason)
        except Exception as exc:
            # The deny list refuses it already; the CA's revocation is best effort.
            log.warning("the issuer did not revoke serial %x (%s)", serial, type(exc).__name__)

    async def suspend(self, name: str, reason: str) -> Peer:
        """Refuse the peer's calls from its next call on."""
        return await self.grants.set_peer_state(
            name, PeerState.SUSPENDED, reason, allowed_from=(PeerState.ACTIVE,))

    async def revoke(self, name: str, reason: str) -> Peer:
        """Refuse the peer for good: state, deny list and the issuer's revocation."""
        peer = await self.grants.set_peer_state(
            name, PeerState.REVOKED, reason,
            allowed_from=(PeerState.INVITED, PeerState.ACTIVE, PeerState.SUSPENDED))
        if peer.certificate_serial:
            serial = int(peer.certificate_serial, 16)
            self._deny(serial)
            issuer = self._issuer()
            if issuer is not None:
                try:
                    await issuer.revoke(serial, reason=reason or "peer revoked")
                except Exception as exc:
                    # The peer is refused by state and deny list already; the CA's own
                    # revocation is best effort and retried by an admin.
                    log.warning("peer %s: the issuer did not revoke serial %x (%s)",
                                name, serial, type(exc).__name__)
        return peer


def issuer_key_types(kind: str) -> frozenset[str]:
    """The peer key types an issuer of this kind signs (P-256 for every issuer)."""
    return _ISSUER_KEYS.get(kind, frozenset({KEY_P256}))


def key_type_of(public_key: Any) -> str:
    """'p256', 'ed25519', or a description of any other key (which is refused)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return KEY_P256 if isinstance(public_key.curve, ec.SECP256R1) else public_key.curve.name
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return KEY_ED25519
    return type(public_key).__name__


def check_csr(csr_pem: bytes, identity: SpiffeId, *,
              key_types: frozenset[str] = frozenset({KEY_P256})) -> None:
    """A CSR may name exactly the invited identity and nothing else, with an allowed key.

    Any extra SAN (a DNS name, an IP, another URI) could let the peer's certificate pass
    as this node's server or as another identity, so it is refused, not dropped. Keys
    other than P-256 (and Ed25519 where the issuer signs it) are refused: an unusual
    curve such as secp256k1 is one more implementation every verifier must get right.
    """
    def bad(why: str) -> InvalidArgument:
        return InvalidArgument([FieldViolation("csr_pem", why)])

    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        # Parsed lazily: a curve the library lacks or a repeated extension raises here.
        public_key, extensions = csr.public_key(), csr.extensions
    except (ValueError, UnsupportedAlgorithm, x509.DuplicateExtension) as exc:
        raise bad(f"is not a certificate signing request this node can read "
                  f"({type(exc).__name__})") from None
    key_type = key_type_of(public_key)
    if key_type not in key_types:
        allowed = "P-256 or Ed25519" if KEY_ED25519 in key_types else "P-256"
        raise bad(f"key must be {allowed}, not {key_type}")
    if not csr.is_signature_valid:
        raise bad("signature does not verify")
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise bad(f"must carry the URI SAN {identity.uri}") from None
    names: list[Any] = list(san)
    if len(names) != 1 or not isinstance(names[0], x509.UniformResourceIdentifier) \
            or names[0].value != identity.uri:
        raise bad(f"must carry exactly one SAN, the URI {identity.uri}")
    if len(csr.subject) != 0:
        # A CN is what TLS clients fall back to when matching a host name: a peer choosing
        # CN=localhost could pose as this node's server to clients that dial "localhost".
        raise bad("subject must be empty; the identity is carried by the URI SAN alone")
    if len(extensions) != 1:
        raise bad("may carry no extension other than the subject alternative name")

