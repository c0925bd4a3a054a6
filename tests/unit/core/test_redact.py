"""Unit tests of tessera.core: redact."""

from __future__ import annotations

import pytest

from tessera.core.redact import redact_secrets as redact
from tessera.store import redact_dsn


def test_quoted_key_value_passwords_and_client_keys_are_never_shown() -> None:
    from tessera.core.redact import redact_url
    from tessera_client import Credentials

    shown = redact_dsn("host=h password='my secret' dbname=d")
    assert "secret" not in shown and "password=***" in shown
    assert "sig" not in redact_url("https://u:pw@crl.example/ca.crl?sig=abc123&x=1").replace(
        "sig=***", "") and "abc123" not in redact_url("https://crl.example/c?sig=abc123")
    assert "PRIVATE" not in repr(Credentials(b"ca", b"cert", b"-----BEGIN PRIVATE KEY-----"))


def test_crl_url_passwords_are_redacted() -> None:
    from tessera.core.redact import redact_url

    assert redact_url("https://u:pw@crl.example/x.crl") == "https://u:***@crl.example/x.crl"
    assert redact_url("http://crl.example/x.crl") == "http://crl.example/x.crl"


@pytest.mark.parametrize(("text", "secret"), [
    ("connecting to postgresql://tessera:s3cr3t-pw@db:5432/tessera failed", "s3cr3t-pw"),
    ("dsn host=db user=t password=s3cr3t-pw dbname=x", "s3cr3t-pw"),
    ("redis://:s3cr3t-pw@valkey:6379/0 down", "s3cr3t-pw"),
    ("fetching https://ca/crl?token=s3cr3t-pw&x=1", "s3cr3t-pw"),
    ("provisioner password: 's3cr3t-pw'", "s3cr3t-pw"),
])
def test_redaction_masks_passwords_and_tokens(text: str, secret: str) -> None:
    cleaned = redact(text)
    assert secret not in cleaned and "***" in cleaned
    assert redact("nothing secret in spiffe://tessera.local/node/a") == \
        "nothing secret in spiffe://tessera.local/node/a"
