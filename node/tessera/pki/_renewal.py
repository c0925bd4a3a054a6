"""Background renewal of the node's certificates, with either issuer.

Each `ManagedCertificate` renews its files at about `renew_fraction` of the lifetime
(a little earlier, by a random jitter, so replicas do not renew in lockstep). A failed
renewal is retried with capped exponential backoff (capped so several attempts fit in
what is left of the lifetime); meanwhile the state is DEGRADED, a metric counts the
failure, a warning is logged and `doctor` shows it. Once less than 1/6 of the lifetime
is left, `tessera_certificate_renewal_urgent{identity}` is 1.

A certificate that was revoked (its serial on the node's deny list, or a renewal the CA
refuses as revoked) or that expired is re-enrolled at once with the provisioner, with a
new key, when the issuer can sign - unless its serial was decommissioned
(`tessera certs revoke --decommission`). Expiry is never silent: the state becomes
EXPIRED and every attempt logs an error.

Several serving processes of one node (`--workers`) manage the same files: a renewal
runs under an exclusive file lock beside the certificate, and a process that finds the
files renewed by another one (on its next look, every half second, or when it takes the
lock to renew) adopts them instead of renewing again. So the node renews once and every
process serves the new certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import fcntl
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tessera.core.errors import FailedPrecondition, TesseraError
from tessera.core.paths import CredentialFiles
from tessera.observability import Metrics
from tessera.pki._csr import new_key_and_csr
from tessera.pki._enrol import split_sans
from tessera.pki._files import write_atomic, write_atomic_pair
from tessera.pki._identity import SpiffeId
from tessera.pki._issuer import IssuedCertificate, Issuer
from tessera.pki._tls import TlsMaterial
from tessera.pki.stepca._client import StepCAUnauthorized, redact

log = logging.getLogger(__name__)

_RANDOM = secrets.SystemRandom()
#: Largest share of the lifetime by which a renewal is brought forward at random.
JITTER_FRACTION = 0.05


class CertState(enum.StrEnum):
    """Renewal state of one certificate."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    EXPIRED = "expired"


@dataclass(frozen=True)
class CertificateStatus:
    """What `certs status`, doctor and GetCertificateStatus show about one certificate."""

    name: str
    identity: str
    serial: int
    sans: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    renew_at: dt.datetime
    state: CertState
    issuer: str
    last_error: str
    renewals: int
    failures: int
    #: Serials this identity held before, newest first (`certs revoke` names them).
    previous_serials: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (serial in hex, times in ISO 8601)."""
        out = asdict(self)
        out["serial"] = format(self.serial, "x")
        out["sans"] = list(self.sans)
        for k in ("not_before", "not_after", "renew_at"):
            out[k] = getattr(self, k).isoformat()
        out["state"] = self.state.value
        out["previous_serials"] = [format(v, "x") for v in self.previous_serials]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CertificateStatus:
        """Inverse of `to_json`."""
        return cls(
            name=str(data["name"]), identity=str(data["identity"]),
            serial=int(str(data["serial"]), 16), sans=tuple(data["sans"]),
            not_before=dt.datetime.fromisoformat(data["not_before"]),
            not_after=dt.datetime.fromisoformat(data["not_after"]),
            renew_at=dt.datetime.fromisoformat(data["renew_at"]),
            state=CertState(data["state"]), issuer=str(data["issuer"]),
            last_error=str(data["last_error"]), renewals=int(data["renewals"]),
            failures=int(data["failures"]),
            previous_serials=tuple(int(str(v), 16) for v in data.get("previous_serials", ())),
        )


def describe_error(exc: BaseException) -> str:
    """A one-line, secret-free description of a renewal failure."""
    if isinstance(exc, TesseraError):
        return f"{type(exc).__name__}: {redact(exc.message)}"
    return f"{type(exc).__name__}: {redact(str(exc))}"


def sans_of(leaf: x509.Certificate) -> tuple[str, ...]:
    """All SANs of a certificate as strings."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(str(v.value) for v in san)


def check_issued(leaf: x509.Certificate, key_pem: bytes, sans: tuple[str, ...]) -> None:
    """Raise ValueError unless `leaf` is for the key in `key_pem` and carries `sans`."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if leaf.public_key() != key.public_key():
        raise ValueError("the issued certificate is not for our key; keeping the current one")
    if sorted(sans_of(leaf)) != sorted(sans):
        raise ValueError(f"the issued certificate names SANs {sorted(sans_of(leaf))}, "
                         f"not {sorted(sans)}; keeping the current one")


def status_file(files: CredentialFiles) -> Path:
    """Where a managed certificate's renewal state is written (next to the certificate)."""
    return files.cert.with_suffix(".renewal.json")


def lock_file(files: CredentialFiles) -> Path:
    """Held while one process of the node renews these files."""
    return files.cert.with_suffix(".renewal.lock")


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def read_status(files: CredentialFiles) -> CertificateStatus | None:
    """The renewal state a running node last wrote for these files, if any."""
    try:
        return CertificateStatus.from_json(json.loads(status_file(files).read_text()))
    except (OSError, ValueError, KeyError):
        return None


class ManagedCertificate:
    """One certificate kept fresh in its files; `on_renewed` gets the new material."""

    def __init__(
        self,
        name: str,
        files: CredentialFiles,
        issuer: Issuer,
        *,
        renew_fraction: float = 2 / 3,
        metrics: Metrics | None = None,
        on_renewed: Callable[[TlsMaterial], None] | None = None,
        can_reenrol: bool = False,
        decommissioned: Callable[[int], bool] | None = None,
    ) -> None:
        self.name = name
        self.files = files
        self.issuer = issuer
        self.renew_fraction = renew_fraction
        self.metrics = metrics
        self.on_renewed = on_renewed
        self.can_reenrol = can_reenrol
        #: True for a serial the operator retired for good: never re-enrolled.
        self.decommissioned = decommissioned or (lambda serial: False)
        #: The serial found revoked (deny list, or a renewal refused as revoked).
        self.revoked_serial: int | None = None
        self.previous_serials: tuple[int, ...] = ()
        self.last_error = ""
        self.renewals = 0
        self.failures = 0
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._stamp = _stamp(files.cert)
        self._leaf = self._read_leaf()
        self._renew_at = self._schedule(self._leaf)
        if metrics is not None:
            metrics.cert_renewal_urgent.labels(name).set_function(self.urgent)
        self._set_state(self._initial_state())

    # ------------------------------------------------------------------ state

    def _read_leaf(self) -> x509.Certificate:
        return x509.load_pem_x509_certificates(self.files.cert.read_bytes())[0]

    def _schedule(self, leaf: x509.Certificate) -> dt.datetime:
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        jitter = lifetime * _RANDOM.uniform(0, JITTER_FRACTION)
        return leaf.not_valid_before_utc + lifetime * self.renew_fraction - jitter

    def urgent(self) -> float:
        """1.0 while less than 1/6 of the lifetime is left (renewal overdue), else 0.0."""
        leaf = self._leaf
        left = leaf.not_valid_after_utc - dt.datetime.now(dt.UTC)
        return 1.0 if left < (leaf.not_valid_after_utc - leaf.not_valid_before_utc) / 6 else 0.0

    @property
    def serial(self) -> int:
        """Serial of the certificate held now."""
        return self._leaf.serial_number

    def mark_revoked(self, serial: int) -> bool:
        """The certificate with `serial` was revoked: re-enrol now if it is the current
        one and may be healed. True when a re-enrolment was scheduled."""
        if serial != self._leaf.serial_number or self.revoked_serial == serial:
            return False
        self.revoked_serial = serial
        if self.decommissioned(serial) or not self.can_reenrol:
            why = ("decommissioned: it is not re-enrolled" if self.decommissioned(serial)
                   else "no provisioner key to re-enrol with")
            self.last_error = f"certificate {serial:x} revoked; {why}"
            log.error("certificate %s (serial %x) was revoked; %s", self.name, serial, why)
            self._set_state(CertState.DEGRADED)
            return False
        log.warning("certificate %s (serial %x) was revoked: re-enrolling with a new key",
                    self.name, serial)
        self.failures = 0
        self._wake.set()
        return True

    def _initial_state(self) -> CertState:
        if self._leaf.not_valid_after_utc <= dt.datetime.now(dt.UTC):
            return CertState.EXPIRED
        return CertState.HEALTHY

    def _set_state(self, state: CertState) -> None:
        self.state = state
        if self.metrics is not None:
            for s in CertState:
                self.metrics.cert_state.labels(self.name, s.value).set(1 if s is state else 0)
        self._persist()

    def status(self) -> CertificateStatus:
        """The current status."""
        leaf = self._leaf
        state = self.state
        if leaf.not_valid_after_utc <= dt.datetime.now(dt.UTC):
            state = CertState.EXPIRED
        uris = [s for s in sans_of(leaf) if s.startswith("spiffe://")]
        return CertificateStatus(
            name=self.name, identity=uris[0] if uris else "", serial=leaf.serial_number,
            sans=sans_of(leaf), not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc, renew_at=self._renew_at, state=state,
            issuer=self.issuer.kind, last_error=self.last_error, renewals=self.renewals,
            failures=self.failures, previous_serials=self.previous_serials,
        )

    def _persist(self) -> None:
        try:
            write_atomic(status_file(self.files),
                         json.dumps(self.status().to_json(), indent=2).encode())
        except OSError as exc:
            log.warning("could not write %s (%s)", status_file(self.files), type(exc).__name__)

    # --------------------------------------------------------------- renewal

    def _healable(self, serial: int) -> bool:
        return self.can_reenrol and not self.decommissioned(serial)

    def adopt_from_disk(self) -> bool:
        """Take the certificate another process of the node wrote to the files, if the
        files changed and hold a valid pair for another serial. True when adopted."""
        stamp = _stamp(self.files.cert)
        if stamp is None or stamp == self._stamp:
            return False
        try:
            chain_pem = self.files.cert.read_bytes()
            key_pem = self.files.key.read_bytes()
            leaf = x509.load_pem_x509_certificates(chain_pem)[0]
            check_issued(leaf, key_pem, sans_of(self._leaf))
            roots_pem = self.files.ca.read_bytes()
        except (OSError, ValueError):
            return False  # half written (the key not yet beside it): the next look
        self._stamp = stamp
        if leaf.serial_number == self._leaf.serial_number:
            return False
        self.previous_serials = (self._leaf.serial_number, *self.previous_serials)[:8]
        self._leaf = leaf
        self._renew_at = self._schedule(leaf)
        self.failures = 0
        self.last_error = ""
        if self.on_renewed is not None:
            self.on_renewed(TlsMaterial(chain_pem, key_pem, roots_pem))
        log.info("certificate %s renewed by another process of the node: serial %x",
                 self.name, leaf.serial_number)
        self._set_state(CertState.HEALTHY)
        self._wake.set()
        return True

    @contextlib.asynccontextmanager
    async def _files_locked(self) -> AsyncIterator[None]:
        """The node-wide renewal lock of these files (polled: never blocks the loop)."""
        fd = os.open(lock_file(self.files), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.05)
            yield
        finally:
            os.close(fd)  # releases the lock

    async def renew_now(self, *, force: bool = True) -> CertificateStatus:
        """Renew (or, if expired or revoked, re-enrol) once; raise on failure after
        recording it. Unless `force`d, files another process renewed meanwhile are
        adopted instead."""
        async with self._lock, self._files_locked():
            if self.adopt_from_disk() and not force:
                return self.status()
            try:
                try:
                    await self._renew()
                except StepCAUnauthorized:
                    # The CA refuses to renew a revoked certificate: heal by enrolling
                    # anew, at once, unless the operator decommissioned it.
                    serial = self._leaf.serial_number
                    if self.revoked_serial == serial or not self._healable(serial):
                        raise
                    log.warning("certificate %s (serial %x): renewal refused as revoked; "
                                "re-enrolling with a new key", self.name, serial)
                    self.revoked_serial = serial
                    await self._renew()
            except Exception as exc:
                self._failed(exc)
                raise
            self._wake.set()
            return self.status()

    async def _renew(self) -> None:
        chain_pem = self.files.cert.read_bytes()
        key_pem = self.files.key.read_bytes()
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
        expired = leaf.not_valid_after_utc <= dt.datetime.now(dt.UTC)
        revoked = self.revoked_serial == leaf.serial_number
        if revoked and self.decommissioned(leaf.serial_number):
            raise FailedPrecondition(
                f"certificate {leaf.serial_number:x} was revoked and decommissioned; "
                "enrol again with `tessera certs enroll --force` to use this identity",
                reason="CERT_DECOMMISSIONED")
        reenrol = (expired or revoked) and self.can_reenrol
        if reenrol:
            # An expired or revoked certificate cannot prove itself over mTLS: enrol anew,
            # with a new key (the old one may be why it was revoked).
            key_pem, issued = await self._reenrol(leaf)
            how = "re-enrolled after revocation" if revoked else "re-enrolled"
        else:
            issued = await self.issuer.renew(chain_pem, key_pem)
            how = "renewed"
        new_leaf = x509.load_pem_x509_certificates(issued.chain_pem)[0]
        # Nothing is written unless the new certificate fits: a pair that does not match
        # (or names other SANs) would break the next handshake or change our identity.
        check_issued(new_leaf, key_pem, sans_of(leaf))
        # The CA file first: a process adopting the new pair reads the roots beside it.
        write_atomic(self.files.ca, self.issuer.roots_pem())
        if reenrol:
            write_atomic_pair(self.files.cert, issued.chain_pem, self.files.key, key_pem)
        else:
            write_atomic(self.files.cert, issued.chain_pem)
        self._stamp = _stamp(self.files.cert)
        self.previous_serials = (leaf.serial_number, *self.previous_serials)[:8]
        self._leaf = new_leaf
        self._renew_at = self._schedule(new_leaf)
        self.renewals += 1
        self.failures = 0
        self.last_error = ""
        if self.metrics is not None:
            self.metrics.cert_renewals.labels(self.name, "ok").inc()
        if self.on_renewed is not None:
            self.on_renewed(TlsMaterial(issued.chain_pem, key_pem, self.issuer.roots_pem()))
        log.info("certificate %s %s: serial %x, valid until %s, next renewal at %s",
                 self.name, how, new_leaf.serial_number,
                 new_leaf.not_valid_after_utc.isoformat(), self._renew_at.isoformat())
        self._set_state(CertState.HEALTHY)

    async def _reenrol(self, leaf: x509.Certificate) -> tuple[bytes, IssuedCertificate]:
        sans = sans_of(leaf)
        uris = [s for s in sans if s.startswith("spiffe://")]
        ident = SpiffeId.parse(uris[0])
        dns, ips = split_sans(s for s in sans if s != ident.uri)
        request = new_key_and_csr(ident, dns, ips)
        return request.key_pem, await self.issuer.sign(request.csr_pem)

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self.last_error = describe_error(exc)
        if self.metrics is not None:
            self.metrics.cert_renewals.labels(self.name, "failed").inc()
        left = self._leaf.not_valid_after_utc - dt.datetime.now(dt.UTC)
        if left <= dt.timedelta(0):
            log.error("certificate %s EXPIRED %s ago and could not be renewed (%s)",
                      self.name, -left, self.last_error)
            self._set_state(CertState.EXPIRED)
        else:
            log.warning("certificate %s renewal failed (%s); it expires in %s",
                        self.name, self.last_error, left)
            self._set_state(CertState.DEGRADED)

    def _backoff_s(self) -> float:
        lifetime = self._leaf.not_valid_after_utc - self._leaf.not_valid_before_utc
        left = self._leaf.not_valid_after_utc - dt.datetime.now(dt.UTC)
        # Short-lived certificates need quick retries; long-lived ones need no storm; and
        # several attempts must still fit in what is left before expiry.
        cap = max(1.0, min(300.0, lifetime.total_seconds() / 20, left.total_seconds() / 4))
        base: float = min(cap, 0.5 * 2 ** min(self.failures, 20))
        return base * _RANDOM.uniform(0.8, 1.0)

    async def run(self) -> None:
        """Renew on schedule until cancelled."""
        while True:
            if self.revoked_serial == self._leaf.serial_number and not self.failures \
                    and self._healable(self._leaf.serial_number):
                delay = 0.0  # revoked: re-enrol at once
            elif self.failures:
                delay = self._backoff_s()
            else:
                delay = (self._renew_at - dt.datetime.now(dt.UTC)).total_seconds()
            if delay > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)
                    continue  # renewed on demand (RotateCertificate): reschedule
                except TimeoutError:
                    pass
            try:
                await self.renew_now(force=False)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: S110 - recorded, logged and counted in _failed
                pass
            self._wake.clear()
