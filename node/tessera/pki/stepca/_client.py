"""An asyncio client for smallstep step-ca 0.19: enrol, renew, revoke, pinned bootstrap.

The node talks to step-ca in four ways:

* `fetch_root` fetches the root over TLS that is not yet verified and accepts it only if
  its SHA-256 fingerprint equals the pinned one; every later call verifies against it.
* `mint_ott` makes the one-time token (an ES256 JWT signed by the JWK provisioner key)
  that authorises one `/1.0/sign`.
* `StepCAClient.sign` / `renew` / `revoke` call the CA's HTTP API.

Errors are split so that callers can act on them: `StepCAUnavailable` is transient (the
CA could not be reached or failed inside), `StepCARefused` and its subclasses are
answers. A transient error must never be taken as "revoked". No message carries a
token, a key, a password or a CSR.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import logging
import os
import re
import secrets
import ssl
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tessera.core.codec import b64url_decode, b64url_encode
from tessera.core.errors import TesseraError, Unavailable
from tessera.pki._issuer import IssuedCertificate

__all__ = [
    "StepCABadRequest",
    "StepCAClient",
    "StepCAError",
    "StepCAForbidden",
    "StepCAProtocolError",
    "StepCARefused",
    "StepCARootMismatch",
    "StepCATLSError",
    "StepCAUnauthorized",
    "StepCAUnavailable",
    "fetch_root",
    "mint_ott",
    "normalize_fingerprint",
    "redact",
    "verify_root_fingerprint",
]

_log = logging.getLogger("tessera.pki.stepca")

_DEFAULT_TIMEOUT_S: Final = 10.0
_SIGN_PATH: Final = "/1.0/sign"
_RENEW_PATH: Final = "/1.0/renew"
_REVOKE_PATH: Final = "/1.0/revoke"
# RFC 5280 ub-common-name; longer SPIFFE IDs go in the URI SAN only.
_HEX64_RE: Final = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------- errors


class StepCAError(TesseraError):
    """A step-ca call failed; `status` is the HTTP status when the CA answered."""

    reason = "STEPCA_ERROR"

    def __init__(
        self, message: str, *, operation: str, status: int | None = None, ca_message: str = ""
    ) -> None:
        super().__init__(message)
        #: What was attempted: "sign", "renew", "revoke", "root", "health".
        self.operation = operation
        #: HTTP status of the CA's answer, None when there was no answer.
        self.status = status
        #: The CA's own (redacted) message, empty when there was none.
        self.ca_message = ca_message


class StepCAUnavailable(StepCAError, Unavailable):
    """The CA could not be reached, timed out or failed inside (5xx): retry later."""

    reason = "STEPCA_UNAVAILABLE"


class StepCARefused(StepCAError):
    """The CA answered and refused the request; repeating it unchanged will not help."""

    reason = "STEPCA_REFUSED"


class StepCABadRequest(StepCARefused):
    """The CA found the request malformed (HTTP 400)."""

    reason = "STEPCA_BAD_REQUEST"


class StepCAUnauthorized(StepCARefused):
    """The CA did not accept the credential: a bad, used or expired token, or a revoked
    or unknown certificate (HTTP 401)."""

    reason = "STEPCA_UNAUTHORIZED"


class StepCAForbidden(StepCARefused):
    """The CA accepted the credential but not the request, e.g. SANs that differ from
    the token's (HTTP 403)."""

    reason = "STEPCA_FORBIDDEN"


class StepCARootMismatch(StepCAError):
    """The CA's root does not have the pinned fingerprint; nothing from it is trusted."""

    reason = "STEPCA_ROOT_MISMATCH"


class StepCATLSError(StepCAError):
    """The TLS handshake failed: the CA's certificate did not verify against the pinned
    root, or the CA rejected the client certificate. Not transient."""

    reason = "STEPCA_TLS_ERROR"


class StepCAProtocolError(StepCAError):
    """The CA answered success with a body this client cannot use."""

    reason = "STEPCA_PROTOCOL_ERROR"


# ------------------------------------------------------------------ identities, CSRs


# ----------------------------------------------------------------- one-time tokens


def mint_ott(
    provisioner_name: str,
    provisioner_private_jwk: Mapping[str, Any] | ec.EllipticCurvePrivateKey,
    kid: str | None,
    ca_url: str,
    subject: str,
    sans: Sequence[str] = (),
    ttl_s: int = 300,
    *,
    audience_path: str = _SIGN_PATH,
    now: float | None = None,
) -> str:
    """Mint a one-time ES256 JWT for a JWK provisioner (for `/1.0/sign` by default).

    `kid` None means the RFC 7638 thumbprint of the key. For a revocation token use
    `audience_path="/1.0/revoke"` and the decimal serial as `subject`.
    """
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    if not subject:
        raise ValueError("subject must not be empty")
    key = _provisioner_key(provisioner_private_jwk)
    if kid is None:
        kid = _jwk_thumbprint(key.public_key())
    issued_at = int(time.time() if now is None else now)
    header = {"alg": "ES256", "typ": "JWT", "kid": kid}
    claims: dict[str, Any] = {
        "iss": provisioner_name,
        "aud": _base_url(ca_url) + audience_path,
        "sub": subject,
        "iat": issued_at,
        "nbf": issued_at,
        "exp": issued_at + ttl_s,
        # step-ca records the jti in its db and refuses a second use of the token.
        "jti": secrets.token_hex(32),
    }
    if sans:
        claims["sans"] = list(sans)
    signing_input = _b64url_json(header) + "." + _b64url_json(claims)
    der = key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    # JWS ES256 wants the raw 64-byte r||s, not the DER that cryptography returns.
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return signing_input + "." + b64url_encode(signature)


def _provisioner_key(
    jwk: Mapping[str, Any] | ec.EllipticCurvePrivateKey,
) -> ec.EllipticCurvePrivateKey:
    if isinstance(jwk, ec.EllipticCurvePrivateKey):
        if not isinstance(jwk.curve, ec.SECP256R1):
            raise ValueError("the provisioner key must be P-256")
        return jwk
    if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256" or "d" not in jwk:
        # Never echo the JWK: it holds the private scalar.
        raise ValueError("the provisioner key must be a private P-256 EC JWK")
    try:
        key = ec.derive_private_key(_b64url_int(str(jwk["d"])), ec.SECP256R1())
        numbers = key.public_key().public_numbers()
        matches = (
            "x" not in jwk
            or "y" not in jwk
            or (numbers.x, numbers.y) == (_b64url_int(str(jwk["x"])), _b64url_int(str(jwk["y"])))
        )
    except ValueError:
        raise ValueError("the provisioner JWK is not a valid P-256 key") from None
    if not matches:
        raise ValueError("the provisioner JWK's public part does not match its private part")
    return key


def _jwk_thumbprint(key: ec.EllipticCurvePublicKey) -> str:
    numbers = key.public_numbers()
    canonical = json.dumps(
        {
            "crv": "P-256",
            "kty": "EC",
            "x": b64url_encode(numbers.x.to_bytes(32, "big")),
            "y": b64url_encode(numbers.y.to_bytes(32, "big")),
        },
        separators=(",", ":"),
        sort_keys=True,
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(canonical.encode())
    return b64url_encode(digest.finalize())


# ------------------------------------------------------------------- issued chains


def _issued_chain(operation: str, body: Mapping[str, Any]) -> IssuedCertificate:
    try:
        chain = body.get("certChain") or [body["crt"], body["ca"]]
        pems = [str(c).strip() for c in chain if c]
        certs = [x509.load_pem_x509_certificate(p.encode()) for p in pems]
    except (KeyError, TypeError, ValueError):
        raise StepCAProtocolError(
            f"step-ca {operation}: the answer holds no usable certificate chain",
            operation=operation,
        ) from None
    if not certs:
        raise StepCAProtocolError(
            f"step-ca {operation}: the answer holds no certificate", operation=operation
        )
    return IssuedCertificate.from_chain(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))


# --------------------------------------------------------------------- root pinning


def normalize_fingerprint(fingerprint_sha256: str) -> str:
    """Lowercase hex without separators; raise ValueError unless it is a SHA-256."""
    fp = re.sub(r"[\s:-]", "", fingerprint_sha256).lower()
    if not _HEX64_RE.fullmatch(fp):
        raise ValueError("a root fingerprint is 64 hex digits (SHA-256 of the root's DER)")
    return fp


def verify_root_fingerprint(root_pem: bytes, fingerprint_sha256: str) -> x509.Certificate:
    """Parse `root_pem` and return it only if its SHA-256 DER fingerprint is the pinned one."""
    pinned = normalize_fingerprint(fingerprint_sha256)
    try:
        cert = x509.load_pem_x509_certificate(root_pem)
    except ValueError:
        raise StepCAProtocolError(
            "step-ca root: the answer is not a PEM certificate", operation="root"
        ) from None
    actual = cert.fingerprint(hashes.SHA256()).hex()
    if not hmac.compare_digest(actual, pinned):
        raise StepCARootMismatch(
            f"step-ca root: fingerprint {actual} is not the pinned {pinned}; refusing it",
            operation="root",
        )
    return cert


async def fetch_root(
    ca_url: str, fingerprint_sha256: str, *, timeout_s: float = _DEFAULT_TIMEOUT_S
) -> bytes:
    """Fetch the CA's root and return its PEM if it matches the pinned fingerprint."""
    pinned = normalize_fingerprint(fingerprint_sha256)
    base = _base_url(ca_url)
    # The one call without certificate verification: there is no root to verify
    # against yet. Trust comes from the fingerprint check below, not from TLS.
    async with httpx.AsyncClient(
        base_url=base,
        verify=False,  # noqa: S501 - pinned by fingerprint below
        timeout=timeout_s,
        trust_env=False,
    ) as client:
        response = await _request(client, "root", "GET", f"/root/{pinned}")
    if response.status_code == httpx.codes.NOT_FOUND:
        raise StepCARootMismatch(
            f"step-ca root: the CA at {base} has no root with fingerprint {pinned}",
            operation="root",
            status=response.status_code,
        )
    body = _json_body("root", response)
    pem = body.get("ca")
    if not isinstance(pem, str):
        raise StepCAProtocolError("step-ca root: the answer holds no 'ca'", operation="root")
    cert = verify_root_fingerprint(pem.encode(), pinned)
    return cert.public_bytes(serialization.Encoding.PEM)


# -------------------------------------------------------------------------- client


class StepCAClient:
    """Calls one step-ca over TLS verified against its (pinned) root."""

    def __init__(
        self, ca_url: str, root_pem: bytes, *, timeout_s: float = _DEFAULT_TIMEOUT_S
    ) -> None:
        self._base = _base_url(ca_url)
        self._root_pem = root_pem
        self._timeout_s = timeout_s
        self._client = httpx.AsyncClient(
            base_url=self._base,
            verify=_tls_context(root_pem),
            timeout=timeout_s,
            # The CA is addressed directly; an HTTPS_PROXY from the environment must
            # not sit in the middle of certificate issuance.
            trust_env=False,
        )

    @classmethod
    async def bootstrap(
        cls, ca_url: str, fingerprint_sha256: str, *, timeout_s: float = _DEFAULT_TIMEOUT_S
    ) -> Self:
        """Fetch and pin the root by fingerprint, then return a client verifying against it."""
        root_pem = await fetch_root(ca_url, fingerprint_sha256, timeout_s=timeout_s)
        return cls(ca_url, root_pem, timeout_s=timeout_s)

    @property
    def ca_url(self) -> str:
        """The CA's base URL."""
        return self._base

    @property
    def root_pem(self) -> bytes:
        """The root this client verifies the CA against."""
        return self._root_pem

    async def aclose(self) -> None:
        """Close pooled connections."""
        await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def health(self) -> None:
        """Return if the CA reports itself healthy, raise StepCAUnavailable otherwise."""
        response = await _request(self._client, "health", "GET", "/health")
        body = _json_body("health", response)
        if body.get("status") != "ok":
            raise StepCAUnavailable(
                "step-ca health: the CA does not report status ok",
                operation="health",
                status=response.status_code,
            )

    async def sign(
        self, csr_pem: bytes | str, ott: str, *, ttl: dt.timedelta | None = None
    ) -> IssuedCertificate:
        """Exchange a CSR and a one-time token for a certificate (`/1.0/sign`).

        `ttl` asks for a lifetime other than the provisioner's default; it must lie
        within the provisioner's min/max claims.
        """
        csr = csr_pem.decode() if isinstance(csr_pem, bytes) else csr_pem
        body: dict[str, Any] = {"csr": csr, "ott": ott}
        if ttl is not None:
            if ttl <= dt.timedelta(0):
                raise ValueError("ttl must be positive")
            # A Go duration relative to now, e.g. "3600s".
            body["notAfter"] = f"{max(1, round(ttl.total_seconds()))}s"
        response = await _request(self._client, "sign", "POST", _SIGN_PATH, json=body)
        chain = _issued_chain("sign", _json_body("sign", response))
        _log.info("step-ca issued serial %s", chain.serial)
        return chain

    async def renew(self, cert_chain_pem: bytes, key_pem: bytes) -> IssuedCertificate:
        """Renew a still-valid certificate over mTLS with itself (`/1.0/renew`)."""
        async with self._mtls_client(cert_chain_pem, key_pem) as client:
            response = await _request(client, "renew", "POST", _RENEW_PATH)
        chain = _issued_chain("renew", _json_body("renew", response))
        _log.info("step-ca renewed a certificate as serial %s", chain.serial)
        return chain

    async def revoke(
        self,
        serial: int | str,
        reason: str = "",
        *,
        reason_code: int = 0,
        mtls: tuple[bytes, bytes] | None = None,
        ott: str | None = None,
    ) -> None:
        """Revoke a serial (passively: step-ca 0.19 has no CRL/OCSP), by mTLS or token.

        With `mtls=(cert_chain_pem, key_pem)` the certificate revokes itself; with
        `ott` a revocation token (sub = the decimal serial) authorises it.
        """
        if (mtls is None) == (ott is None):
            raise ValueError("revoke needs exactly one of mtls=(cert, key) or ott=")
        if not 0 <= reason_code <= 10 or reason_code == 7:  # RFC 5280 CRLReason values
            raise ValueError(f"reason_code {reason_code} is not an RFC 5280 CRLReason")
        body: dict[str, Any] = {
            "serial": str(int(serial)),
            "reasonCode": reason_code,
            "reason": reason,
            # 0.19 implements passive revocation only: the serial is recorded in the
            # CA's db (refusing renewal); relying parties learn of it from a CRL/deny list.
            "passive": True,
        }
        if ott is not None:
            body["ott"] = ott
            await _request(self._client, "revoke", "POST", _REVOKE_PATH, json=body)
        elif mtls is not None:
            async with self._mtls_client(*mtls) as client:
                await _request(client, "revoke", "POST", _REVOKE_PATH, json=body)
        _log.info("step-ca revoked serial %s (reason code %d)", body["serial"], reason_code)

    def _mtls_client(self, cert_chain_pem: bytes, key_pem: bytes) -> httpx.AsyncClient:
        context = _tls_context(self._root_pem)
        _load_client_cert(context, cert_chain_pem, key_pem)
        return httpx.AsyncClient(
            base_url=self._base, verify=context, timeout=self._timeout_s, trust_env=False
        )


# ------------------------------------------------------------------------ plumbing


async def _request(
    client: httpx.AsyncClient,
    operation: str,
    method: str,
    path: str,
    *,
    json: Mapping[str, Any] | None = None,
) -> httpx.Response:
    """Send one request and turn every failure into the StepCAError category it is."""
    try:
        response = await client.request(method, path, json=json)
    except (httpx.TransportError, OSError) as exc:
        # httpx wraps most network errors, but a TLS alert that arrives with the
        # response (TLS 1.3 rejects a client certificate after the handshake) comes
        # through as a bare ssl.SSLError.
        raise _transport_error(operation, str(client.base_url), exc) from exc
    if response.is_success:
        return response
    if operation == "root" and response.status_code == httpx.codes.NOT_FOUND:
        return response  # fetch_root turns this into StepCARootMismatch
    raise _http_error(operation, response)


def _transport_error(operation: str, base: str, exc: Exception) -> StepCAError:
    tls = _find_ssl_error(exc)
    if tls is not None:
        detail = getattr(tls, "reason", None) or type(tls).__name__
        if isinstance(tls, ssl.SSLCertVerificationError):
            text = f"the CA's certificate did not verify against the pinned root ({detail})"
        else:
            text = f"the TLS handshake failed ({detail})"
        return StepCATLSError(f"step-ca {operation}: {text}", operation=operation)
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "could not reach"
    return StepCAUnavailable(
        f"step-ca {operation}: {kind} the CA at {base.rstrip('/')} ({type(exc).__name__})",
        operation=operation,
    )


def _find_ssl_error(exc: BaseException) -> ssl.SSLError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return current
        current = current.__cause__ or current.__context__
    return None


def _http_error(operation: str, response: httpx.Response) -> StepCAError:
    status = response.status_code
    ca_message = _ca_message(response)
    text = f"step-ca {operation} failed with HTTP {status}"
    if ca_message:
        text += f": {ca_message}"
    kinds: dict[int, type[StepCAError]] = {
        400: StepCABadRequest,
        401: StepCAUnauthorized,
        403: StepCAForbidden,
    }
    cls: type[StepCAError]
    if status in kinds:
        cls = kinds[status]
    elif status >= 500 and status != httpx.codes.NOT_IMPLEMENTED:
        cls = StepCAUnavailable
    else:
        cls = StepCARefused
    _log.warning("step-ca %s answered HTTP %d", operation, status)
    return cls(text, operation=operation, status=status, ca_message=ca_message)


def _json_body(operation: str, response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise StepCAProtocolError(
            f"step-ca {operation}: HTTP {response.status_code} without a JSON object",
            operation=operation,
            status=response.status_code,
        )
    return body


_PEM_RE: Final = re.compile(r"-----BEGIN [^-]+-----.*?(-----END [^-]+-----|$)", re.DOTALL)
_JWS_RE: Final = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
_LONG_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9+/_=-]{40,}")


def _ca_message(response: httpx.Response) -> str:
    """step-ca's message for an error, redacted of anything that could be a secret."""
    try:
        body = response.json()
        message = str(body.get("message", "")) if isinstance(body, dict) else ""
    except ValueError:
        message = response.text
    return redact(message)


def redact(text: str, *, limit: int = 300) -> str:
    """Strip PEM blocks, JWS/JWT-like strings and long opaque runs; cap the length."""
    text = _PEM_RE.sub("[pem redacted]", text)
    text = _JWS_RE.sub("[token redacted]", text)
    text = _LONG_TOKEN_RE.sub("[redacted]", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _tls_context(root_pem: bytes) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=root_pem.decode("ascii"))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _load_client_cert(context: ssl.SSLContext, cert_chain_pem: bytes, key_pem: bytes) -> None:
    """Load a client certificate into `context` without writing the key to a disk file."""
    try:
        if hasattr(os, "memfd_create"):
            # An anonymous in-memory file: the key never touches a filesystem.
            fds = [os.memfd_create(n, os.MFD_CLOEXEC) for n in ("tessera-crt", "tessera-key")]
            try:
                for fd, data in zip(fds, (cert_chain_pem, key_pem), strict=True):
                    _write_all(fd, data)
                context.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
            finally:
                for fd in fds:
                    os.close(fd)
        else:
            with tempfile.TemporaryDirectory(prefix="tessera-mtls-") as tmp:
                crt, key = Path(tmp) / "crt.pem", Path(tmp) / "key.pem"
                for path, data in ((crt, cert_chain_pem), (key, key_pem)):
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    try:
                        _write_all(fd, data)
                    finally:
                        os.close(fd)
                context.load_cert_chain(crt, key)
    except ssl.SSLError:
        # The SSL error text is generic, but say nothing about the key's content.
        raise ValueError(
            "the client certificate and key could not be loaded (not PEM, or not a pair)"
        ) from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _base_url(ca_url: str) -> str:
    parts = urlsplit(ca_url.strip())
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"the CA URL {ca_url!r} must be https://host[:port]")
    return f"https://{parts.netloc}"


def _b64url_json(value: Mapping[str, Any]) -> str:
    return b64url_encode(json.dumps(value, separators=(",", ":")).encode())


def _b64url_int(text: str) -> int:
    return int.from_bytes(b64url_decode(text), "big")
