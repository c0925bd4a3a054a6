"""Unit tests of tessera.pki.stepca: issuer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tessera.core.codec import b64url_encode
from tessera.core.errors import ConfigError
from tessera.pki import DevCA
from tessera.pki.stepca._config import private_jwk_from_key
from tessera.pki.stepca._issuer import token_claims
from tests.fixtures.certs import TD, ca_cert, pem


def test_bootstrap_token_claims_are_read_without_echoing_a_bad_token() -> None:
    payload = b64url_encode(json.dumps({"sub": "alpha", "sans": ["spiffe://x/node/alpha"]}).encode())
    assert token_claims(f"e30.{payload}.sig").sans == ("spiffe://x/node/alpha",)
    with pytest.raises(ValueError) as info:
        token_claims("secret-looking-garbage")
    assert "secret-looking-garbage" not in str(info.value)


def test_a_root_bundle_is_trusted_only_for_the_pinned_certificate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tessera.pki.stepca._issuer import _read_local_files

    a, b = DevCA(tmp_path / "a", TD), DevCA(tmp_path / "b", TD)
    bundle = tmp_path / "roots.pem"
    bundle.write_bytes(b.roots_pem() + a.roots_pem())
    root_pem, _, _ = _read_local_files(str(bundle), a.fingerprint_sha256(), "p", "", "", "")
    assert root_pem == a.roots_pem()
    assert "only the one matching" in caplog.text
    with pytest.raises(ConfigError, match=r"^ca\.root_file: no certificate"):
        _read_local_files(str(bundle), "ab" * 32, "p", "", "", "")


def test_secret_files_readable_by_others_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tessera.pki.stepca._issuer import _read_local_files

    key = ec.generate_private_key(ec.SECP256R1())
    f = tmp_path / "k.json"
    f.write_text(json.dumps(private_jwk_from_key(key)))
    f.chmod(0o644)
    _read_local_files("", "", "p", str(f), "", "")
    assert "ca.provisioner_key_file" in caplog.text and "chmod 600" in caplog.text
    caplog.clear()
    f.chmod(0o600)
    _read_local_files("", "", "p", str(f), "", "")
    assert "chmod" not in caplog.text


async def test_refresh_roots_keeps_the_configured_timeout(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    from tessera.pki.stepca import _issuer as _stepca_issuer
    from tessera.pki.stepca._client import StepCAClient
    from tessera.pki.stepca._issuer import StepCAIssuer

    root = pem(ca_cert(ec.generate_private_key(ec.SECP256R1()), "R"))
    seen: list[float] = []

    async def fake_fetch(url: str, fp: str, *, timeout_s: float = 10.0) -> bytes:
        seen.append(timeout_s)
        return root

    monkeypatch.setattr(_stepca_issuer, "fetch_root", fake_fetch)
    other = pem(ca_cert(ec.generate_private_key(ec.SECP256R1()), "Old"))
    issuer = StepCAIssuer(StepCAClient("https://127.0.0.1:9", other, timeout_s=3.5),
                          root_fingerprint="ab" * 32, timeout_s=3.5)
    try:
        assert await issuer.refresh_roots()
        assert seen == [3.5]
        assert issuer.client._timeout_s == 3.5
    finally:
        await issuer.aclose()
