"""Unit tests of tessera.pki: renewal."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tessera.observability import Metrics
from tessera.pki import CertState, DevCA, IssuedCertificate, ManagedCertificate
from tessera.pki.stepca._client import StepCAUnavailable
from tests.fixtures.certs import dev_files
from tests.fixtures.waiting import wait_until


async def expired(cert: Path) -> None:
    """Wait until the wall clock is past the certificate's notAfter (polled, no guessed sleep)."""
    leaf = x509.load_pem_x509_certificate(await asyncio.to_thread(cert.read_bytes))
    await wait_until(lambda: dt.datetime.now(dt.UTC) > leaf.not_valid_after_utc,
                     "the certificate has expired")


class _DownIssuer:
    kind = "step-ca"

    def __init__(self, roots: bytes) -> None:
        self.roots = roots

    async def sign(self, csr_pem: bytes, *, ttl: dt.timedelta | None = None) -> IssuedCertificate:
        raise StepCAUnavailable("step-ca sign: could not reach the CA", operation="sign")

    async def renew(self, chain_pem: bytes, key_pem: bytes) -> IssuedCertificate:
        raise StepCAUnavailable("step-ca renew: could not reach the CA", operation="renew")

    async def revoke(self, serial: int, *, reason: str = "") -> None:
        raise StepCAUnavailable("step-ca revoke: could not reach the CA", operation="revoke")

    def roots_pem(self) -> bytes:
        return self.roots


class _WrongKeyIssuer:
    """Answers a renewal with a certificate for some other key."""

    kind = "dev-ca"

    def __init__(self, ca: DevCA) -> None:
        self.ca = ca

    async def sign(self, csr_pem: bytes, *, ttl: dt.timedelta | None = None) -> IssuedCertificate:
        raise NotImplementedError

    async def renew(self, chain_pem: bytes, key_pem: bytes) -> IssuedCertificate:
        other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        return await self.ca.renew(chain_pem, other)

    async def revoke(self, serial: int, *, reason: str = "") -> None:
        raise NotImplementedError

    def roots_pem(self) -> bytes:
        return self.ca.roots_pem()


async def test_renewal_with_the_dev_ca_swaps_in_a_new_serial(tmp_path: Path) -> None:
    ca, files = dev_files(tmp_path, ttl=dt.timedelta(hours=1))
    old = x509.load_pem_x509_certificate(files.cert.read_bytes()).serial_number
    seen: list[int] = []
    metrics = Metrics()
    m = ManagedCertificate("node", files, ca, metrics=metrics,
                           on_renewed=lambda mat: seen.append(mat.leaf().serial_number))
    status = await m.renew_now()
    assert status.serial != old and seen == [status.serial]
    assert status.state is CertState.HEALTHY
    assert "localhost" in status.sans
    assert metrics.registry.get_sample_value(
        "tessera_certificate_renewals_total", {"identity": "node", "result": "ok"}) == 1


async def test_failed_renewal_degrades_counts_and_keeps_the_certificate(tmp_path: Path) -> None:
    ca, files = dev_files(tmp_path, ttl=dt.timedelta(hours=1))
    before = files.cert.read_bytes()
    metrics = Metrics()
    m = ManagedCertificate("node", files, _DownIssuer(ca.roots_pem()), metrics=metrics)
    with pytest.raises(StepCAUnavailable):
        await m.renew_now()
    status = m.status()
    assert status.state is CertState.DEGRADED
    assert status.last_error.startswith("StepCAUnavailable:")
    assert files.cert.read_bytes() == before
    assert metrics.registry.get_sample_value(
        "tessera_certificate_state", {"identity": "node", "state": "degraded"}) == 1
    assert metrics.registry.get_sample_value(
        "tessera_certificate_renewals_total", {"identity": "node", "result": "failed"}) == 1


async def test_expired_certificate_is_re_enrolled_with_a_new_key(tmp_path: Path) -> None:
    ca, files = dev_files(tmp_path, ttl=dt.timedelta(seconds=1))
    old_key = files.key.read_bytes()
    m = ManagedCertificate("node", files, ca, can_reenrol=True)
    await expired(files.cert)
    status = await m.renew_now()
    assert status.state is CertState.HEALTHY
    assert files.key.read_bytes() != old_key
    assert status.not_after > dt.datetime.now(dt.UTC)


async def test_a_renewed_certificate_for_another_key_is_not_swapped_in(tmp_path: Path) -> None:
    ca, files = dev_files(tmp_path, ttl=dt.timedelta(hours=1))
    before = files.cert.read_bytes(), files.key.read_bytes()
    swapped: list[object] = []
    m = ManagedCertificate("node", files, _WrongKeyIssuer(ca), on_renewed=swapped.append)
    with pytest.raises(ValueError, match="not for our key"):
        await m.renew_now()
    assert (files.cert.read_bytes(), files.key.read_bytes()) == before
    assert swapped == [] and m.status().state is CertState.DEGRADED


async def test_re_enrolment_leaves_a_matching_pair(tmp_path: Path) -> None:
    from tessera.pki import credentials_valid

    ca, files = dev_files(tmp_path, ttl=dt.timedelta(seconds=1))
    m = ManagedCertificate("node", files, ca, can_reenrol=True)
    await expired(files.cert)
    await m.renew_now()
    assert credentials_valid(files, ca.roots_pem())
    assert files.key.stat().st_mode & 0o777 == 0o600
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp file left
