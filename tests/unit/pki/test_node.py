"""Unit tests of tessera.pki: node."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tessera import config
from tessera.core.errors import ConfigError
from tessera.pki import DevCA, SpiffeId
from tessera.pki._identity import IdentityKind
from tests.fixtures.certs import TD, crl_at


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_no_crl_and_an_unreachable_crl_url_refuses_to_start(tmp_path: Path) -> None:
    from tessera.core.paths import NodePaths
    from tessera.pki._node import NodeCertificates

    url = f"http://reader:s3cret@127.0.0.1:{_closed_port()}/ca.crl"
    cfg = config.load(None, environ={}, overrides={
        "node.data_dir": str(tmp_path / "data"), "ca.crl_url": url, "ca.timeout_s": "2"})
    p = NodePaths(cfg.node.data_dir)
    ca = DevCA(tmp_path / "ca", TD)
    ca.issue_files(p.server, SpiffeId(TD, IdentityKind.NODE, "n"), ttl=dt.timedelta(hours=1))
    certs = NodeCertificates.create(cfg, p, ca,
                                    p.server)
    with pytest.raises(ConfigError) as info:
        await certs.load_crl(ca.roots_pem())
    message = info.value.message
    assert message.startswith("ca.crl_url:") and "\n" not in message
    assert "s3cret" not in message and "reader:***@" in message

    # With a current CRL stored by an earlier run, the same start succeeds and denies.
    key = serialization.load_pem_private_key(ca.root_key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    root = x509.load_pem_x509_certificate(ca.roots_pem())
    p.pki.mkdir(parents=True, exist_ok=True)
    (p.pki / "crl.der").write_bytes(crl_at(key, root, [4242], age=dt.timedelta(minutes=1),
                                            valid_for=dt.timedelta(days=1)))
    certs = NodeCertificates.create(cfg, p, ca,
                                    p.server)
    await certs.load_crl(ca.roots_pem())
    assert 4242 in certs.deny_list
