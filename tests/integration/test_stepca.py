"""The step-ca client against a real step-ca 0.19: enrol, replay, forgery, renew, revoke."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import AsyncIterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store

from tessera.pki import IdentityKind, KeyAndCsr, SpiffeId, new_key_and_csr
from tessera.pki.stepca._client import (
    StepCAClient,
    StepCAError,
    StepCAForbidden,
    StepCARefused,
    StepCARootMismatch,
    StepCATLSError,
    StepCAUnauthorized,
    StepCAUnavailable,
    fetch_root,
    mint_ott,
    verify_root_fingerprint,
)
from tessera.pki.stepca._config import init_stepca
from tests.fixtures.stepca import RunningStepCA, free_loopback_port

TRUST_DOMAIN = "example.org"


@pytest.fixture
async def client(stepca: RunningStepCA) -> AsyncIterator[StepCAClient]:
    """A client that pinned the test CA's root by fingerprint."""
    ca = await StepCAClient.bootstrap(stepca.url, stepca.fingerprint)
    async with ca:
        yield ca


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


async def _enrol(
    stepca: RunningStepCA, client: StepCAClient, name: str
) -> tuple[bytes, bytes, int]:
    req = make_csr(TRUST_DOMAIN, "node", name, dns_names=[f"{name}.example.org"])
    chain = await client.sign(req.csr_pem, stepca.ott(req.subject, req.sans))
    return chain.chain_pem, req.key_pem, chain.serial


async def test_enrolment_with_provisioner_token_issues_spiffe_leaf_chaining_to_root(
    stepca: RunningStepCA, client: StepCAClient
) -> None:
    req = make_csr(
        TRUST_DOMAIN, "node", "alpha", dns_names=["alpha.example.org"], ip_addresses=["127.0.0.1"]
    )

    chain = await client.sign(req.csr_pem, stepca.ott(req.subject, req.sans))

    leaf = chain.certificate
    san = _san(leaf)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://example.org/node/alpha"
    ]
    assert san.get_values_for_type(x509.DNSName) == ["alpha.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    key = serialization.load_pem_private_key(req.key_pem, password=None)
    assert leaf.public_key() == key.public_key()
    root = x509.load_pem_x509_certificate(stepca.root_pem)
    intermediates = x509.load_pem_x509_certificates(chain.chain_pem)[1:]
    verifier = PolicyBuilder().store(Store([root])).build_client_verifier()
    verified = verifier.verify(leaf, intermediates)
    assert verified.chain[-1] == root
    # Short-lived by the provisioner's default (60 s, plus step-ca's 1 min backdate).
    assert chain.not_after - chain.not_before <= dt.timedelta(minutes=3)


async def test_same_token_twice_is_unauthorized(
    stepca: RunningStepCA, client: StepCAClient
) -> None:
    req = make_csr(TRUST_DOMAIN, "node", "replay")
    ott = stepca.ott(req.subject, req.sans)
    await client.sign(req.csr_pem, ott)

    with pytest.raises(StepCAUnauthorized) as caught:
        await client.sign(req.csr_pem, ott)

    assert caught.value.status == 401


async def test_token_signed_by_unknown_key_is_unauthorized(
    stepca: RunningStepCA, client: StepCAClient
) -> None:
    req = make_csr(TRUST_DOMAIN, "node", "forged")
    intruder = ec.generate_private_key(ec.SECP256R1())
    # Same issuer and kid as the real provisioner: only the signature is wrong.
    forged = mint_ott(
        stepca.files.provisioner_name,
        intruder,
        stepca.files.provisioner_kid,
        stepca.url,
        req.subject,
        req.sans,
    )
    # Its own kid: no such provisioner key.
    unknown = mint_ott(
        stepca.files.provisioner_name, intruder, None, stepca.url, req.subject, req.sans
    )

    for token in (forged, unknown):
        with pytest.raises(StepCAUnauthorized):
            await client.sign(req.csr_pem, token)


async def test_csr_whose_sans_differ_from_the_token_is_refused(
    stepca: RunningStepCA, client: StepCAClient
) -> None:
    req = make_csr(TRUST_DOMAIN, "node", "greedy", dns_names=["evil.example.org"])
    ott = stepca.ott(req.subject, [req.identity.uri, "greedy.example.org"])

    with pytest.raises(StepCAForbidden) as caught:
        await client.sign(req.csr_pem, ott)

    assert isinstance(caught.value, StepCARefused)
    assert caught.value.status == 403


async def test_renewal_over_mtls_gives_a_new_serial_with_the_same_identity(
    stepca: RunningStepCA, client: StepCAClient
) -> None:
    chain_pem, key_pem, serial = await _enrol(stepca, client, "renewer")

    renewed = await client.renew(chain_pem, key_pem)

    assert renewed.serial != serial
    assert renewed.uris == ["spiffe://example.org/node/renewer"]
    assert _san(renewed.certificate).get_values_for_type(x509.DNSName) == ["renewer.example.org"]
    # The renewed certificate can itself renew: rotation goes on indefinitely.
    again = await client.renew(renewed.chain_pem, key_pem)
    assert again.serial not in (serial, renewed.serial)


async def test_revoked_certificate_cannot_renew(
    stepca: RunningStepCA, client: StepCAClient
) -> None:
    chain_pem, key_pem, serial = await _enrol(stepca, client, "revoked-mtls")

    await client.revoke(serial, "key compromise", reason_code=1, mtls=(chain_pem, key_pem))

    with pytest.raises(StepCAUnauthorized):
        await client.renew(chain_pem, key_pem)


async def test_revocation_by_token_blocks_renewal(
    stepca: RunningStepCA, client: StepCAClient
) -> None:
    chain_pem, key_pem, serial = await _enrol(stepca, client, "revoked-ott")
    ott = stepca.ott(str(serial), audience_path="/1.0/revoke")

    await client.revoke(serial, "peer revoked", ott=ott)

    with pytest.raises(StepCAUnauthorized):
        await client.renew(chain_pem, key_pem)


async def test_certificate_from_another_ca_cannot_renew(
    stepca: RunningStepCA, client: StepCAClient
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "stranger")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )

    # A refusal of the client certificate, not an outage.
    with pytest.raises(StepCATLSError):
        await client.renew(cert.public_bytes(serialization.Encoding.PEM), key_pem)


async def test_fetch_root_returns_the_pinned_root(stepca: RunningStepCA) -> None:
    root_pem = await fetch_root(stepca.url, stepca.fingerprint.upper())

    assert x509.load_pem_x509_certificate(root_pem) == x509.load_pem_x509_certificate(
        stepca.root_pem
    )


async def test_fetch_root_with_a_wrong_fingerprint_is_refused(stepca: RunningStepCA) -> None:
    wrong = "00" * 32

    with pytest.raises(StepCARootMismatch):
        await fetch_root(stepca.url, wrong)
    # The client-side check on its own: a root that is not the pinned one is refused.
    with pytest.raises(StepCARootMismatch):
        verify_root_fingerprint(stepca.root_pem, wrong)


async def test_ca_not_verifying_against_the_pinned_root_is_a_tls_error(
    stepca: RunningStepCA, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = init_stepca(tmp_path_factory.mktemp("other-ca"), address="127.0.0.1:9")

    async with StepCAClient(stepca.url, other.root_cert.read_bytes()) as wrong_root:
        with pytest.raises(StepCATLSError) as caught:
            await wrong_root.health()

    assert not isinstance(caught.value, StepCAUnavailable)


async def test_closed_port_is_unavailable_not_a_refusal(stepca: RunningStepCA) -> None:
    url = f"https://127.0.0.1:{free_loopback_port()}"
    req = make_csr(TRUST_DOMAIN, "node", "offline")

    async with StepCAClient(url, stepca.root_pem, timeout_s=5) as offline:
        with pytest.raises(StepCAUnavailable) as health:
            await offline.health()
        with pytest.raises(StepCAUnavailable) as sign:
            await offline.sign(req.csr_pem, stepca.ott(req.subject, req.sans))
    with pytest.raises(StepCAUnavailable):
        await fetch_root(url, stepca.fingerprint, timeout_s=5)

    for caught in (health, sign):
        assert not isinstance(caught.value, StepCARefused)
        assert caught.value.status is None


async def test_no_secret_appears_in_errors_or_logs(
    stepca: RunningStepCA,
    client: StepCAClient,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    req = make_csr(TRUST_DOMAIN, "node", "secretive", dns_names=["secretive.example.org"])
    ott = stepca.ott(req.subject, req.sans)
    chain = await client.sign(req.csr_pem, ott)
    errors: list[StepCAError] = []
    tokens = [
        ott,  # replayed
        ott + "x",  # mangled signature
        stepca.ott(req.subject, [req.identity.uri]),  # SANs differ from the CSR's
        "not-a-token",
    ]
    for token in tokens:
        with pytest.raises(StepCAError) as caught:
            await client.sign(req.csr_pem, token)
        errors.append(caught.value)
    await client.revoke(chain.serial, mtls=(chain.chain_pem, req.key_pem))
    with pytest.raises(StepCAError) as caught:
        await client.renew(chain.chain_pem, req.key_pem)
    errors.append(caught.value)
    async with StepCAClient(f"https://127.0.0.1:{free_loopback_port()}", stepca.root_pem) as off:
        with pytest.raises(StepCAError) as caught:
            await off.sign(req.csr_pem, ott)
        errors.append(caught.value)

    secrets = {
        "token": ott,
        "token signature": ott.rsplit(".", 1)[1],
        "token claims": ott.split(".")[1],
        "provisioner d": stepca.provisioner_secret(),
        "CA key password": stepca.files.password_file.read_text().strip(),
        **_pem_body_lines("leaf key", req.key_pem),
        **_pem_body_lines("CSR", req.csr_pem),
    }
    captured = capsys.readouterr()
    texts = [caplog.text, captured.out, captured.err]
    for error in errors:
        texts += [str(error), repr(error), error.ca_message, repr(error.args)]
    for label, secret in secrets.items():
        for text in texts:
            assert secret not in text, f"{label} leaked into an error or log line"


def _pem_body_lines(label: str, pem: bytes) -> dict[str, str]:
    lines = [ln for ln in pem.decode().splitlines() if ln and not ln.startswith("-----")]
    return {f"{label} line {i}": ln for i, ln in enumerate(lines) if len(ln) >= 16}


async def test_requested_lifetime_within_the_claims_is_honoured(
    stepca: RunningStepCA, client: StepCAClient
) -> None:
    req = make_csr(TRUST_DOMAIN, "client", "long-lived")

    chain = await client.sign(
        req.csr_pem, stepca.ott(req.subject, req.sans), ttl=dt.timedelta(hours=2)
    )

    # step-ca backdates NotBefore by one minute.
    assert chain.not_after - chain.not_before == dt.timedelta(hours=2, minutes=1)


def make_csr(trust_domain: str, kind: str, name: str, *,
             dns_names: list[str] | None = None,
             ip_addresses: list[str] | None = None) -> KeyAndCsr:
    """A key and CSR for `spiffe://<trust_domain>/<kind>/<name>`."""
    return new_key_and_csr(SpiffeId(trust_domain, IdentityKind(kind), name), dns_names or (),
                           ip_addresses or ())
