"""`StepCAIssuer`: the `Issuer` interface on top of `StepCAClient`.

It signs with a one-time token it mints from the provisioner key, or, lacking one,
with a single-use bootstrap token; it renews over mTLS and revokes with a revocation
token. The node does not know whether it has this or the development CA.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tessera.core.codec import b64url_decode
from tessera.core.errors import ConfigError, FailedPrecondition
from tessera.pki._issuer import IssuedCertificate
from tessera.pki.stepca._client import (
    StepCAClient,
    StepCAError,
    StepCAUnavailable,
    fetch_root,
    mint_ott,
    normalize_fingerprint,
    verify_root_fingerprint,
)
from tessera.pki.stepca._provisioner import load_provisioner_key

log = logging.getLogger(__name__)

#: Lifetime of the one-time tokens the node mints for itself.
_OTT_TTL_S = 300


@dataclass(frozen=True)
class Provisioner:
    """A JWK provisioner's name and private key."""

    name: str
    key: ec.EllipticCurvePrivateKey = field(repr=False)


@dataclass(frozen=True)
class TokenClaims:
    """The unverified `sub` and `sans` of a bootstrap token: what the CSR must carry."""

    subject: str
    sans: tuple[str, ...]


def token_claims(token: str) -> TokenClaims:
    """Read `sub` and `sans` from a JWT without verifying it (step-ca verifies it)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(b64url_decode(payload))
        return TokenClaims(str(claims["sub"]), tuple(str(s) for s in claims.get("sans", ())))
    except (IndexError, KeyError, TypeError, ValueError):
        # Never echo the token itself.
        raise ValueError("the bootstrap token is not a JWT with a 'sub' claim") from None


class StepCAIssuer:
    """Issues, renews and revokes through one step-ca."""

    kind = "step-ca"

    def __init__(
        self,
        client: StepCAClient,
        *,
        provisioner: Provisioner | None = None,
        bootstrap_token: str | None = None,
        root_fingerprint: str = "",
        timeout_s: float = 10.0,
    ) -> None:
        self.client = client
        self.provisioner = provisioner
        self._bootstrap_token = bootstrap_token
        self._root_fingerprint = root_fingerprint
        self._timeout_s = timeout_s

    @classmethod
    async def from_config(
        cls,
        *,
        url: str,
        root_file: str = "",
        root_fingerprint: str = "",
        provisioner_name: str = "tessera",
        provisioner_key_file: str = "",
        provisioner_password_file: str = "",
        bootstrap_token_file: str = "",
        timeout_s: float = 10.0,
        cached_root_file: Path | None = None,
    ) -> StepCAIssuer:
        """Pin the root (file or fingerprint) and load the provisioner key or token."""
        root_pem, provisioner, token = _read_local_files(
            root_file, root_fingerprint, provisioner_name, provisioner_key_file,
            provisioner_password_file, bootstrap_token_file)
        if root_pem is None:
            try:
                root_pem = await fetch_root(url, root_fingerprint, timeout_s=timeout_s)
            except StepCAUnavailable:
                # A node with valid certificates must start while the CA is down: the
                # root it pinned before (checked against the fingerprint again) will do.
                root_pem = _cached_root(cached_root_file, root_fingerprint)
                if root_pem is None:
                    raise
                log.warning("step-ca unreachable; using the pinned root from %s",
                            cached_root_file)
        client = StepCAClient(url, root_pem, timeout_s=timeout_s)
        return cls(client, provisioner=provisioner, bootstrap_token=token,
                   root_fingerprint=normalize_fingerprint(root_fingerprint)
                   if root_fingerprint else "", timeout_s=timeout_s)

    @property
    def has_provisioner(self) -> bool:
        """True when the node can mint its own tokens (and so re-enrol and revoke)."""
        return self.provisioner is not None

    def bootstrap_claims(self) -> TokenClaims | None:
        """What an unused bootstrap token authorises, when there is one and no provisioner."""
        if self.provisioner is not None or self._bootstrap_token is None:
            return None
        return token_claims(self._bootstrap_token)

    def _token_matches(self, subject: str, sans: list[str]) -> bool:
        # The bootstrap token is for the node's own enrolment only: never spend it on
        # another CSR (a peer's), which step-ca would refuse anyway.
        claims = self.bootstrap_claims()
        return claims is not None and claims.subject == subject and \
            sorted(claims.sans) == sorted(sans)

    def roots_pem(self) -> bytes:
        """The pinned root."""
        return self.client.root_pem

    async def refresh_roots(self) -> bool:
        """Fetch the root again (pinned by fingerprint); True when it changed."""
        if not self._root_fingerprint:
            return False
        # ca.timeout_s bounds this call and the new client like every other CA call.
        root_pem = await fetch_root(self.client.ca_url, self._root_fingerprint,
                                    timeout_s=self._timeout_s)
        if root_pem == self.client.root_pem:
            return False
        old = self.client
        self.client = StepCAClient(old.ca_url, root_pem, timeout_s=self._timeout_s)
        await old.aclose()
        return True

    async def sign(self, csr_pem: bytes, *, ttl: timedelta | None = None) -> IssuedCertificate:
        """Sign a CSR with a freshly minted token, or with the bootstrap token (once)."""
        subject, sans = _csr_subject_and_sans(csr_pem)
        if self.provisioner is not None:
            token = mint_ott(self.provisioner.name, self.provisioner.key, None,
                             self.client.ca_url, subject, sans, _OTT_TTL_S)
        elif self._bootstrap_token is not None and self._token_matches(subject, sans):
            # Single use: forget it before the call, so a retry cannot replay it.
            token, self._bootstrap_token = self._bootstrap_token, None
        else:
            raise FailedPrecondition(
                "cannot enrol with step-ca: no provisioner key and no unused bootstrap token; "
                "set ca.provisioner_key_file or a new ca.bootstrap_token_file",
                reason="NO_ENROLMENT_CREDENTIAL",
            )
        return await self.client.sign(csr_pem, token, ttl=ttl)

    async def renew(self, chain_pem: bytes, key_pem: bytes) -> IssuedCertificate:
        """Renew over mTLS with the current certificate."""
        return await self.client.renew(chain_pem, key_pem)

    async def revoke(self, serial: int, *, reason: str = "") -> None:
        """Revoke any serial with a revocation token from the provisioner key."""
        if self.provisioner is None:
            raise FailedPrecondition(
                "revoking another certificate needs the provisioner key; "
                "set ca.provisioner_key_file", reason="NO_PROVISIONER",
            )
        token = mint_ott(self.provisioner.name, self.provisioner.key, None, self.client.ca_url,
                         str(serial), (), _OTT_TTL_S, audience_path="/1.0/revoke")
        await self.client.revoke(serial, reason, ott=token)

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self.client.aclose()


def _cached_root(path: Path | None, fingerprint: str) -> bytes | None:
    """The root previously fetched into `path`, if it still has the pinned fingerprint."""
    if path is None:
        return None
    try:
        data = path.read_bytes()
        roots = x509.load_pem_x509_certificates(data)
    except (OSError, ValueError):
        return None
    for root in roots:
        pem = root.public_bytes(serialization.Encoding.PEM)
        try:
            verify_root_fingerprint(pem, fingerprint)
        except StepCAError:
            continue
        return pem
    return None


def _read_local_files(
    root_file: str, root_fingerprint: str, provisioner_name: str, provisioner_key_file: str,
    provisioner_password_file: str, bootstrap_token_file: str,
) -> tuple[bytes | None, Provisioner | None, str | None]:
    """Root (if given as a file), provisioner key and bootstrap token, read at start."""
    root_pem = None
    if root_file:
        root_pem = Path(root_file).read_bytes()
        try:
            certs = x509.load_pem_x509_certificates(root_pem)
        except ValueError:
            raise ConfigError(f"ca.root_file: {root_file} is not a PEM certificate") from None
        if root_fingerprint:
            root_pem = _pinned_root(root_file, certs, root_fingerprint)
    for setting, secret_file in (("ca.provisioner_key_file", provisioner_key_file),
                                 ("ca.provisioner_password_file", provisioner_password_file),
                                 ("ca.bootstrap_token_file", bootstrap_token_file)):
        _warn_if_exposed(setting, secret_file)
    provisioner = None
    if provisioner_key_file:
        key = load_provisioner_key(
            Path(provisioner_key_file),
            Path(provisioner_password_file) if provisioner_password_file else None,
        )
        provisioner = Provisioner(provisioner_name, key)
    token = None
    if bootstrap_token_file:
        token = Path(bootstrap_token_file).read_text().strip() or None
    return root_pem, provisioner, token


def _pinned_root(root_file: str, certs: list[x509.Certificate], fingerprint: str) -> bytes:
    """Only the certificate of `root_file` that matches the pin.

    The fingerprint pins one root; any other certificate in the bundle (a second root, an
    intermediate) would otherwise be trusted without having been pinned.
    """
    pinned = normalize_fingerprint(fingerprint)
    matching = [c for c in certs if c.fingerprint(hashes.SHA256()).hex() == pinned]
    if not matching:
        raise ConfigError(f"ca.root_file: no certificate in {root_file} has the "
                          f"ca.root_fingerprint {pinned}")
    if len(certs) > 1:
        log.warning("ca.root_file: %s holds %d certificates; only the one matching "
                    "ca.root_fingerprint is trusted", root_file, len(certs))
    pem = matching[0].public_bytes(serialization.Encoding.PEM)
    verify_root_fingerprint(pem, pinned)  # the same check as for a fetched root
    return pem


def _warn_if_exposed(setting: str, path: str) -> None:
    """Log a warning when a secret file is readable or writable by group or others."""
    if not path:
        return
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # reading it reports the problem
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s: %s is accessible by group or others (mode %03o); "
                    "chmod 600 it", setting, path, stat.S_IMODE(mode))


def _csr_subject_and_sans(csr_pem: bytes) -> tuple[str, list[str]]:
    """The token `sub` and `sans` that match a CSR exactly (step-ca compares them)."""
    csr = x509.load_pem_x509_csr(csr_pem)
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError("the CSR carries no subject alternative names") from None
    uris = list(san.get_values_for_type(x509.UniformResourceIdentifier))
    sans: list[Any] = [*uris, *san.get_values_for_type(x509.DNSName)]
    sans += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    cns = csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    subject = str(cns[0].value) if cns else (uris[0] if uris else "")
    if not subject:
        raise ValueError("the CSR has neither a common name nor a URI SAN")
    return subject, [str(s) for s in sans]
