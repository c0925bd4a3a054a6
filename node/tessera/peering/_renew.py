"""Renewal of the client certificates this node holds for calling its peers.

Each peer signed the certificate this node calls it with (data_dir/peers/<name>/), so it
is renewed through that peer: at about `renew_fraction` of its lifetime this node makes
a fresh P-256 key and a CSR for the same identity and calls the peer's
AdminService.RenewPeerCertificate over mTLS with the current certificate. The new pair
replaces the files atomically; the federation's client follows the files, so new calls
use the new certificate while calls in flight finish on the old channel.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from tessera.core.errors import FailedPrecondition
from tessera.observability import Metrics
from tessera.peering._join import OutboundPeer, _check_issued, load_outbound, peers_dir
from tessera.pki import SpiffeId, new_key_and_csr, write_atomic_pair
from tessera_client import AsyncClient
from tessera_client.pb import admin_pb2

log = logging.getLogger(__name__)

_RANDOM = secrets.SystemRandom()
#: Seconds the renewal call may take.
RENEW_TIMEOUT_S = 30.0
#: Longest sleep between looks at data_dir/peers (a peer joined meanwhile is picked up).
MAX_IDLE_S = 5.0


class PeerCertState(enum.StrEnum):
    """Renewal state of one peer certificate."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    EXPIRED = "expired"


@dataclass
class PeerCertStatus:
    """What `peers list`, doctor and metrics show about one peer certificate."""

    name: str
    identity: str
    address: str
    as_identity: str
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    renew_at: dt.datetime
    state: PeerCertState = PeerCertState.HEALTHY
    last_error: str = ""
    failures: int = 0
    renewals: int = 0
    next_attempt: dt.datetime | None = None

    @property
    def lifetime(self) -> dt.timedelta:
        """Validity period of the certificate held now."""
        return self.not_after - self.not_before


def _leaf(peer: OutboundPeer) -> x509.Certificate:
    return x509.load_pem_x509_certificates(peer.cert.read_bytes())[0]


def _verify_chain(chain_pem: bytes, roots_pem: bytes) -> None:
    """The new chain verifies, as a client certificate, against the peer's pinned root."""
    certs = x509.load_pem_x509_certificates(chain_pem)
    try:
        verifier = PolicyBuilder().store(Store(x509.load_pem_x509_certificates(roots_pem))) \
            .build_client_verifier()
        verifier.verify(certs[0], certs[1:])
    except (VerificationError, ValueError) as exc:
        raise FailedPrecondition(
            f"the peer returned a certificate that does not chain to its pinned root ({exc})",
            reason="ENROLMENT_MISMATCH") from None


class PeerCertificateRenewal:
    """Keeps every joined peer's client certificate fresh; one task for all peers."""

    def __init__(self, data_dir: Path, *, renew_fraction: float = 2 / 3,
                 metrics: Metrics | None = None) -> None:
        self.data_dir = data_dir
        self.renew_fraction = renew_fraction
        self.metrics = metrics
        self.status: dict[str, PeerCertStatus] = {}
        self._wake = asyncio.Event()

    # ------------------------------------------------------------------ state

    def _schedule(self, leaf: x509.Certificate) -> dt.datetime:
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        jitter = lifetime * _RANDOM.uniform(0, 0.05)
        return leaf.not_valid_before_utc + lifetime * self.renew_fraction - jitter

    def refresh(self) -> dict[str, PeerCertStatus]:
        """Read data_dir/peers again: new peers, and certificates replaced by a new join."""
        seen: set[str] = set()
        for record in sorted(peers_dir(self.data_dir).glob("*/peer.json")):
            try:
                peer = load_outbound(self.data_dir, record.parent.name)
                leaf = _leaf(peer)
            except (OSError, ValueError, KeyError, IndexError, FailedPrecondition) as exc:
                log.warning("peer record %s unreadable: %s", record, type(exc).__name__)
                continue
            seen.add(peer.name)
            held = self.status.get(peer.name)
            if held is None or held.serial != leaf.serial_number:
                self.status[peer.name] = PeerCertStatus(
                    peer.name, peer.identity, peer.address, peer.as_identity,
                    leaf.serial_number, leaf.not_valid_before_utc, leaf.not_valid_after_utc,
                    self._schedule(leaf),
                    renewals=held.renewals if held is not None else 0)
            self._export(self.status[peer.name])
        for gone in set(self.status) - seen:
            del self.status[gone]
        return self.status

    def _export(self, st: PeerCertStatus) -> None:
        now = dt.datetime.now(dt.UTC)
        if st.not_after <= now:
            st.state = PeerCertState.EXPIRED
        if self.metrics is None:
            return
        self.metrics.peer_cert_expiry.labels(st.name).set(st.not_after.timestamp())
        urgent = st.not_after - now < st.lifetime / 6
        self.metrics.peer_cert_urgent.labels(st.name).set(1 if urgent else 0)

    # --------------------------------------------------------------- renewal

    async def renew(self, name: str) -> PeerCertStatus:
        """Renew one peer's certificate through that peer now; raise on failure."""
        peer = load_outbound(self.data_dir, name)
        identity = SpiffeId.parse(peer.as_identity)
        request = new_key_and_csr(identity, common_name=False)
        async with AsyncClient(peer.address, peer.credentials()) as client:
            resp = await client.admin.RenewPeerCertificate(
                admin_pb2.RenewPeerCertificateRequest(csr_pem=request.csr_pem.decode()),
                timeout=RENEW_TIMEOUT_S)
        chain = resp.certificate_chain_pem.encode()
        # Nothing is written unless the certificate is ours, for our identity, and chains
        # to the root pinned at enrolment.
        _check_issued(chain, request.key_pem, peer.as_identity)
        _verify_chain(chain, peer.ca.read_bytes())
        write_atomic_pair(peer.cert, chain, peer.key, request.key_pem)
        leaf = x509.load_pem_x509_certificates(chain)[0]
        old = self.status.get(name)
        renewals = (old.renewals if old is not None else 0) + 1
        st = PeerCertStatus(peer.name, peer.identity, peer.address, peer.as_identity,
                            leaf.serial_number, leaf.not_valid_before_utc,
                            leaf.not_valid_after_utc, self._schedule(leaf), renewals=renewals)
        self.status[name] = st
        self._export(st)
        if self.metrics is not None:
            self.metrics.peer_cert_renewals.labels(name, "ok").inc()
        log.info("renewed the certificate for calling peer %s: serial %x, valid until %s",
                 name, leaf.serial_number, leaf.not_valid_after_utc.isoformat())
        return st

    def _failed(self, st: PeerCertStatus, exc: BaseException) -> None:
        st.failures += 1
        if isinstance(exc, grpc.aio.AioRpcError):
            st.last_error = f"{exc.code().name}: {exc.details()}"
        else:
            st.last_error = f"{type(exc).__name__}: {getattr(exc, 'message', '') or exc}"
        now = dt.datetime.now(dt.UTC)
        left = st.not_after - now
        st.state = PeerCertState.EXPIRED if left <= dt.timedelta(0) else PeerCertState.DEGRADED
        # Capped so that several attempts fit in what is left of the lifetime.
        cap = max(1.0, min(300.0, st.lifetime.total_seconds() / 20,
                           left.total_seconds() / 4))
        delay = min(cap, 0.5 * 2 ** min(st.failures, 20)) * _RANDOM.uniform(0.8, 1.0)
        st.next_attempt = now + dt.timedelta(seconds=delay)
        if self.metrics is not None:
            self.metrics.peer_cert_renewals.labels(st.name, "failed").inc()
        log.warning("renewing the certificate for calling peer %s failed (%s); it expires in %s",
                    st.name, st.last_error, left)

    async def run(self) -> None:
        """Renew on schedule until cancelled."""
        while True:
            now = dt.datetime.now(dt.UTC)
            for name, st in list(self.refresh().items()):
                due = st.next_attempt if st.failures else st.renew_at
                if due is not None and due <= now:
                    try:
                        await self.renew(name)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        self._failed(st, exc)
            now = dt.datetime.now(dt.UTC)
            dues = [(s.next_attempt if s.failures else s.renew_at) for s in self.status.values()]
            wait = min([MAX_IDLE_S, *((d - now).total_seconds() for d in dues if d)])
            self._wake.clear()
            if wait > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=wait)
                except TimeoutError:
                    pass

    def wake(self) -> None:
        """Look at the peers again now (e.g. after a join)."""
        self._wake.set()
