"""Certificate lifecycle pieces without step-ca: config, deny list, CRLs, keys, renewal."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from tessera import config
from tessera.core.codec import parse_duration
from tessera.core.errors import ConfigError
from tessera.core.paths import CredentialFiles
from tessera.observability import Metrics
from tessera.pki import CertState, DenyList, DevCA, IssuedCertificate, ManagedCertificate, SpiffeId
from tessera.pki._identity import IdentityKind
from tessera.pki.stepca._client import StepCAUnavailable
from tessera.pki.stepca._config import private_jwk_from_key
from tessera.pki.stepca._issuer import token_claims
from tessera.pki.stepca._provisioner import load_provisioner_key
from tests.fixtures.waiting import wait_until

TD = "example.org"


def _load(**overrides: str) -> config.Config:
    return config.load(None, environ={}, overrides=overrides)


# ------------------------------------------------------------------------ config


def test_ca_url_without_a_pinned_root_names_the_setting() -> None:
    with pytest.raises(ConfigError) as info:
        _load(**{"ca.url": "https://127.0.0.1:9000"})
    assert info.value.message.startswith("ca.root_fingerprint:")


def test_ca_settings_come_from_environment_variables() -> None:
    fp = "ab" * 32
    cfg = config.load(None, environ={"TESSERA_CA_URL": "https://ca.example.org:9000",
                                     "TESSERA_CA_ROOT_FINGERPRINT": fp,
                                     "TESSERA_CA_RENEW_FRACTION": "0.75"})
    assert (cfg.ca.url, cfg.ca.root_fingerprint, cfg.ca.renew_fraction) == (
        "https://ca.example.org:9000", fp, 0.75)


@pytest.mark.parametrize(("setting", "value", "named"), [
    ("ca.renew_fraction", "0.95", "ca.renew_fraction:"),
    ("ca.crl_url", "ftp://x/crl", "ca.crl_url:"),
    ("ca.crl_refresh_s", "-1", "ca.crl_refresh_s:"),
    ("ca.provisioner_key_file", "/nonexistent/key.json", "ca.provisioner_key_file:"),
])
def test_bad_ca_setting_fails_with_one_line_naming_it(setting: str, value: str,
                                                      named: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(**{setting: value})
    assert info.value.message.startswith(named)
    assert "\n" not in info.value.message


def test_no_ca_configuration_keeps_the_embedded_default() -> None:
    cfg = _load()
    assert cfg.ca.url == "" and cfg.tier == "embedded"


def test_durations_parse_like_go() -> None:
    assert parse_duration("1h30m") == dt.timedelta(minutes=90)
    assert parse_duration("90s") == dt.timedelta(seconds=90)
    with pytest.raises(ValueError):
        parse_duration("10x")


# -------------------------------------------------------------------- deny list


def _ca_cert(key: ec.EllipticCurvePrivateKey, cn: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))


def _crl(key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate, serials: list[int]) -> bytes:
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateRevocationListBuilder().issuer_name(issuer.subject)
         .last_update(now).next_update(now + dt.timedelta(hours=1)))
    for s in serials:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(s).revocation_date(now).build())
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_deny_list_persists_and_is_seen_by_another_instance(tmp_path: Path) -> None:
    path = tmp_path / "denied.txt"
    first = DenyList(path)
    first.add([42, 0x1F])
    assert 42 in first and 31 in first and 7 not in first
    assert 42 in DenyList(path)
    assert path.read_text() == "31\n42\n"


def test_crl_from_a_trusted_ca_is_honoured_and_an_untrusted_one_changes_nothing(
    tmp_path: Path,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    ca = _ca_cert(key, "Trusted CA")
    deny = DenyList(tmp_path / "denied.txt",
                    trusted_pem=ca.public_bytes(serialization.Encoding.PEM))
    assert deny.set_crl(_crl(key, ca, [7, 8]), source="test") == 2
    assert 7 in deny

    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = _ca_cert(rogue_key, "Trusted CA")  # same name, other key
    with pytest.raises(ValueError, match="not signed by a trusted"):
        deny.set_crl(_crl(rogue_key, rogue, [9]), source="rogue")
    assert 7 in deny and 9 not in deny  # the previous CRL stays in force


# --------------------------------------------------------------- provisioner key


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwe(plaintext: bytes, password: bytes) -> str:
    """PBES2-HS256+A128KW / A256GCM compact JWE, as `step crypto jwk create` writes."""
    salt = os.urandom(16)
    header = {"alg": "PBES2-HS256+A128KW", "enc": "A256GCM", "cty": "jwk+json",
              "p2s": _b64(salt), "p2c": 1000}
    protected = _b64(json.dumps(header).encode())
    kek = PBKDF2HMAC(hashes.SHA256(), 16, b"PBES2-HS256+A128KW\0" + salt, 1000).derive(password)
    cek, iv = os.urandom(32), os.urandom(12)
    sealed = AESGCM(cek).encrypt(iv, plaintext, protected.encode())
    return ".".join([protected, _b64(aes_key_wrap(kek, cek)), _b64(iv), _b64(sealed[:-16]),
                     _b64(sealed[-16:])])


def test_provisioner_key_loads_from_jwk_encrypted_jwe_and_pem(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    want = key.private_numbers().private_value
    password = b"correct horse battery staple"
    pw = tmp_path / "pw"
    pw.write_bytes(password + b"\n")
    plain = tmp_path / "k.json"
    plain.write_text(json.dumps(private_jwk_from_key(key)))
    jwe = tmp_path / "k.jwe"
    jwe.write_text(_jwe(json.dumps(private_jwk_from_key(key)).encode(), password))
    pem = tmp_path / "k.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.BestAvailableEncryption(password)))
    assert load_provisioner_key(plain, None).private_numbers().private_value == want
    assert load_provisioner_key(jwe, pw).private_numbers().private_value == want
    assert load_provisioner_key(pem, pw).private_numbers().private_value == want


def test_wrong_provisioner_password_fails_without_echoing_it(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwe = tmp_path / "k.jwe"
    jwe.write_text(_jwe(json.dumps(private_jwk_from_key(key)).encode(), b"right-password"))
    pw = tmp_path / "pw"
    pw.write_text("wrong-password-123")
    with pytest.raises(ConfigError) as info:
        load_provisioner_key(jwe, pw)
    assert info.value.message.startswith("ca.provisioner_key_file:")
    assert "wrong-password-123" not in info.value.message


def test_bootstrap_token_claims_are_read_without_echoing_a_bad_token() -> None:
    payload = _b64(json.dumps({"sub": "alpha", "sans": ["spiffe://x/node/alpha"]}).encode())
    assert token_claims(f"e30.{payload}.sig").sans == ("spiffe://x/node/alpha",)
    with pytest.raises(ValueError) as info:
        token_claims("secret-looking-garbage")
    assert "secret-looking-garbage" not in str(info.value)


# ---------------------------------------------------------------------- renewal


async def expired(cert: Path) -> None:
    """Wait until the wall clock is past the certificate's notAfter (polled, no guessed sleep)."""
    leaf = x509.load_pem_x509_certificate(await asyncio.to_thread(cert.read_bytes))
    await wait_until(lambda: dt.datetime.now(dt.UTC) > leaf.not_valid_after_utc,
                     "the certificate has expired")


def _dev_files(tmp_path: Path, *, ttl: dt.timedelta) -> tuple[DevCA, CredentialFiles]:
    ca = DevCA(tmp_path / "ca", TD)
    files = CredentialFiles(tmp_path / "n.crt", tmp_path / "n.key", tmp_path / "ca.crt")
    ca.issue_files(files, SpiffeId(TD, IdentityKind.NODE, "n"), ttl=ttl, dns_names=("localhost",))
    return ca, files


async def test_renewal_with_the_dev_ca_swaps_in_a_new_serial(tmp_path: Path) -> None:
    ca, files = _dev_files(tmp_path, ttl=dt.timedelta(hours=1))
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


async def test_failed_renewal_degrades_counts_and_keeps_the_certificate(tmp_path: Path) -> None:
    ca, files = _dev_files(tmp_path, ttl=dt.timedelta(hours=1))
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
    ca, files = _dev_files(tmp_path, ttl=dt.timedelta(seconds=1))
    old_key = files.key.read_bytes()
    m = ManagedCertificate("node", files, ca, can_reenrol=True)
    await expired(files.cert)
    status = await m.renew_now()
    assert status.state is CertState.HEALTHY
    assert files.key.read_bytes() != old_key
    assert status.not_after > dt.datetime.now(dt.UTC)


# ------------------------------------------------- CRL freshness, order, persistence


def _crl_at(key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate, serials: list[int], *,
            age: dt.timedelta, valid_for: dt.timedelta, number: int | None = None) -> bytes:
    """A CRL issued `age` ago whose next_update is `valid_for` after that."""
    this = dt.datetime.now(dt.UTC) - age
    b = (x509.CertificateRevocationListBuilder().issuer_name(issuer.subject)
         .last_update(this).next_update(this + valid_for))
    if number is not None:
        b = b.add_extension(x509.CRLNumber(number), critical=False)
    for s in serials:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(s).revocation_date(this).build())
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


@pytest.fixture
def crl_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, _ca_cert(key, "CRL CA")


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def test_a_replayed_older_crl_does_not_un_revoke(
    tmp_path: Path, crl_ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]
) -> None:
    key, ca = crl_ca
    deny = DenyList(tmp_path / "denied.txt", trusted_pem=_pem(ca))
    older = _crl_at(key, ca, [], age=dt.timedelta(hours=2), valid_for=dt.timedelta(days=1))
    newer = _crl_at(key, ca, [1234], age=dt.timedelta(minutes=1), valid_for=dt.timedelta(days=1))
    deny.set_crl(newer, source="http://crl.example/x.crl")
    with pytest.raises(ValueError, match="older than the CRL in force"):
        deny.set_crl(older, source="http://crl.example/x.crl")
    assert 1234 in deny


def test_a_crl_with_a_lower_crl_number_is_refused(
    tmp_path: Path, crl_ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]
) -> None:
    key, ca = crl_ca
    deny = DenyList(tmp_path / "denied.txt", trusted_pem=_pem(ca))
    deny.set_crl(_crl_at(key, ca, [5], age=dt.timedelta(minutes=5),
                         valid_for=dt.timedelta(days=1), number=7), source="t")
    # A later last_update cannot make up for going back in CRL Number.
    with pytest.raises(ValueError, match="CRL Number 6"):
        deny.set_crl(_crl_at(key, ca, [], age=dt.timedelta(0),
                             valid_for=dt.timedelta(days=1), number=6), source="t")
    assert 5 in deny
    assert deny.set_crl(_crl_at(key, ca, [5, 6], age=dt.timedelta(0),
                                valid_for=dt.timedelta(days=1), number=8), source="t") == 2


def test_an_expired_crl_is_refused(
    tmp_path: Path, crl_ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]
) -> None:
    key, ca = crl_ca
    deny = DenyList(tmp_path / "denied.txt", trusted_pem=_pem(ca))
    expired = _crl_at(key, ca, [9], age=dt.timedelta(days=2), valid_for=dt.timedelta(days=1))
    with pytest.raises(ValueError, match="expired"):
        deny.set_crl(expired, source="t")
    assert deny.crl_in_force is None and not deny.crl_fresh()


def test_the_crl_in_force_survives_a_restart(
    tmp_path: Path, crl_ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]
) -> None:
    key, ca = crl_ca
    store = tmp_path / "pki" / "crl.der"
    deny = DenyList(tmp_path / "denied.txt", trusted_pem=_pem(ca), crl_store=store)
    deny.set_crl(_crl_at(key, ca, [77], age=dt.timedelta(minutes=1),
                         valid_for=dt.timedelta(days=1)), source="t")
    assert store.exists()
    again = DenyList(tmp_path / "denied.txt", trusted_pem=_pem(ca), crl_store=store)
    assert 77 in again and again.crl_fresh()
    # The restarted node also refuses a replay of an older CRL.
    with pytest.raises(ValueError, match="older"):
        again.set_crl(_crl_at(key, ca, [], age=dt.timedelta(hours=1),
                              valid_for=dt.timedelta(days=1)), source="t")
    # A stored CRL from another CA is not used.
    other_key = ec.generate_private_key(ec.SECP256R1())
    assert 77 not in DenyList(tmp_path / "denied.txt",
                              trusted_pem=_pem(_ca_cert(other_key, "Other")), crl_store=store)


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
    (p.pki / "crl.der").write_bytes(_crl_at(key, root, [4242], age=dt.timedelta(minutes=1),
                                            valid_for=dt.timedelta(days=1)))
    certs = NodeCertificates.create(cfg, p, ca,
                                    p.server)
    await certs.load_crl(ca.roots_pem())
    assert 4242 in certs.deny_list


async def test_a_crl_larger_than_the_cap_is_refused(tmp_path: Path) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tessera.pki import _denylist

    class Big(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()  # no Content-Length: the cap must hold while streaming
            chunk = b"\0" * 65536
            for _ in range(_denylist.MAX_CRL_BYTES // len(chunk) + 2):
                self.wfile.write(chunk)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Big)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/big.crl"
        with pytest.raises(ValueError, match="larger than"):
            await _denylist._fetch(url, b"", 5.0)
    finally:
        server.shutdown()
        server.server_close()


def test_crl_url_passwords_are_redacted() -> None:
    from tessera.core.redact import redact_url

    assert redact_url("https://u:pw@crl.example/x.crl") == "https://u:***@crl.example/x.crl"
    assert redact_url("http://crl.example/x.crl") == "http://crl.example/x.crl"


# ---------------------------------------------------------- deny-list file races


def test_concurrent_adders_lose_no_serial(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "denied.txt"
    start = threading.Barrier(8)

    def adder(base: int) -> None:
        own = DenyList(path)  # as separate `certs revoke` runs would
        start.wait()
        for i in range(40):
            own.add([base * 1000 + i])

    threads = [threading.Thread(target=adder, args=(n,)) for n in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = {b * 1000 + i for b in range(1, 9) for i in range(40)}
    assert DenyList(path).listed == want


def test_a_second_revocation_within_the_same_mtime_tick_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "denied.txt"
    server = DenyList(path)
    DenyList(path).add([1])
    server._checked = 0
    assert 1 in server
    st = path.stat()
    DenyList(path).add([2])
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same mtime as before
    server._checked = 0
    assert 2 in server


# ------------------------------------------------------------------- root bundles


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

    root = _pem(_ca_cert(ec.generate_private_key(ec.SECP256R1()), "R"))
    seen: list[float] = []

    async def fake_fetch(url: str, fp: str, *, timeout_s: float = 10.0) -> bytes:
        seen.append(timeout_s)
        return root

    monkeypatch.setattr(_stepca_issuer, "fetch_root", fake_fetch)
    other = _pem(_ca_cert(ec.generate_private_key(ec.SECP256R1()), "Old"))
    issuer = StepCAIssuer(StepCAClient("https://127.0.0.1:9", other, timeout_s=3.5),
                          root_fingerprint="ab" * 32, timeout_s=3.5)
    try:
        assert await issuer.refresh_roots()
        assert seen == [3.5]
        assert issuer.client._timeout_s == 3.5
    finally:
        await issuer.aclose()


# --------------------------------------------------------- dev-CA reissue, renewal


def test_needs_reissue_checks_the_signature_and_the_key(tmp_path: Path) -> None:
    from tessera.pki import needs_reissue

    ca, files = _dev_files(tmp_path, ttl=dt.timedelta(hours=1))
    assert not needs_reissue(files.cert, files.key, ca_roots_pem=ca.roots_pem())
    # Another root with the very same subject did not issue it.
    twin = DevCA(tmp_path / "twin", TD)
    assert twin.roots_pem() != ca.roots_pem()
    assert needs_reissue(files.cert, files.key, ca_roots_pem=twin.roots_pem())
    # A key that does not belong to the certificate.
    files.key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    assert needs_reissue(files.cert, files.key, ca_roots_pem=ca.roots_pem())


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


async def test_a_renewed_certificate_for_another_key_is_not_swapped_in(tmp_path: Path) -> None:
    ca, files = _dev_files(tmp_path, ttl=dt.timedelta(hours=1))
    before = files.cert.read_bytes(), files.key.read_bytes()
    swapped: list[object] = []
    m = ManagedCertificate("node", files, _WrongKeyIssuer(ca), on_renewed=swapped.append)
    with pytest.raises(ValueError, match="not for our key"):
        await m.renew_now()
    assert (files.cert.read_bytes(), files.key.read_bytes()) == before
    assert swapped == [] and m.status().state is CertState.DEGRADED


async def test_re_enrolment_leaves_a_matching_pair(tmp_path: Path) -> None:
    from tessera.pki import credentials_valid

    ca, files = _dev_files(tmp_path, ttl=dt.timedelta(seconds=1))
    m = ManagedCertificate("node", files, ca, can_reenrol=True)
    await expired(files.cert)
    await m.renew_now()
    assert credentials_valid(files, ca.roots_pem())
    assert files.key.stat().st_mode & 0o777 == 0o600
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp file left


# ------------------------------------------------------------- certs revoke serial


@pytest.mark.parametrize(("text", "hex_flag", "want"), [
    ("1f", False, 0x1F),
    ("0x1F", False, 0x1F),
    ("01:ab:CD", False, 0x01ABCD),
    ("1234", False, 1234),
    ("1234", True, 0x1234),
])
def test_revoke_serials_parse_as_status_prints_them(text: str, hex_flag: bool,
                                                    want: int) -> None:
    from tessera.cli.certs import parse_serial

    assert parse_serial(text, hex_digits=hex_flag) == want


@pytest.mark.parametrize("text", ["", "0x", "12g4", "-5", "0"])
def test_bad_revoke_serials_are_refused(text: str) -> None:
    from tessera.cli.certs import parse_serial

    with pytest.raises(ValueError, match="not a serial"):
        parse_serial(text)
