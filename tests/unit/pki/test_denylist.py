"""Unit tests of tessera.pki: denylist."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tessera.pki import DenyList
from tests.fixtures.certs import ca_cert, crl_at, pem


def _crl(key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate, serials: list[int]) -> bytes:
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateRevocationListBuilder().issuer_name(issuer.subject)
         .last_update(now).next_update(now + dt.timedelta(hours=1)))
    for s in serials:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(s).revocation_date(now).build())
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)




@pytest.fixture
def crl_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, ca_cert(key, "CRL CA")




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
    ca = ca_cert(key, "Trusted CA")
    deny = DenyList(tmp_path / "denied.txt",
                    trusted_pem=ca.public_bytes(serialization.Encoding.PEM))
    assert deny.set_crl(_crl(key, ca, [7, 8]), source="test") == 2
    assert 7 in deny

    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = ca_cert(rogue_key, "Trusted CA")  # same name, other key
    with pytest.raises(ValueError, match="not signed by a trusted"):
        deny.set_crl(_crl(rogue_key, rogue, [9]), source="rogue")
    assert 7 in deny and 9 not in deny  # the previous CRL stays in force


def test_a_replayed_older_crl_does_not_un_revoke(
    tmp_path: Path, crl_ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]
) -> None:
    key, ca = crl_ca
    deny = DenyList(tmp_path / "denied.txt", trusted_pem=pem(ca))
    older = crl_at(key, ca, [], age=dt.timedelta(hours=2), valid_for=dt.timedelta(days=1))
    newer = crl_at(key, ca, [1234], age=dt.timedelta(minutes=1), valid_for=dt.timedelta(days=1))
    deny.set_crl(newer, source="http://crl.example/x.crl")
    with pytest.raises(ValueError, match="older than the CRL in force"):
        deny.set_crl(older, source="http://crl.example/x.crl")
    assert 1234 in deny


def test_a_crl_with_a_lower_crl_number_is_refused(
    tmp_path: Path, crl_ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]
) -> None:
    key, ca = crl_ca
    deny = DenyList(tmp_path / "denied.txt", trusted_pem=pem(ca))
    deny.set_crl(crl_at(key, ca, [5], age=dt.timedelta(minutes=5),
                         valid_for=dt.timedelta(days=1), number=7), source="t")
    # A later last_update cannot make up for going back in CRL Number.
    with pytest.raises(ValueError, match="CRL Number 6"):
        deny.set_crl(crl_at(key, ca, [], age=dt.timedelta(0),
                             valid_for=dt.timedelta(days=1), number=6), source="t")
    assert 5 in deny
    assert deny.set_crl(crl_at(key, ca, [5, 6], age=dt.timedelta(0),
                                valid_for=dt.timedelta(days=1), number=8), source="t") == 2


def test_an_expired_crl_is_refused(
    tmp_path: Path, crl_ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]
) -> None:
    key, ca = crl_ca
    deny = DenyList(tmp_path / "denied.txt", trusted_pem=pem(ca))
    expired = crl_at(key, ca, [9], age=dt.timedelta(days=2), valid_for=dt.timedelta(days=1))
    with pytest.raises(ValueError, match="expired"):
        deny.set_crl(expired, source="t")
    assert deny.crl_in_force is None and not deny.crl_fresh()


def test_the_crl_in_force_survives_a_restart(
    tmp_path: Path, crl_ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]
) -> None:
    key, ca = crl_ca
    store = tmp_path / "pki" / "crl.der"
    deny = DenyList(tmp_path / "denied.txt", trusted_pem=pem(ca), crl_store=store)
    deny.set_crl(crl_at(key, ca, [77], age=dt.timedelta(minutes=1),
                         valid_for=dt.timedelta(days=1)), source="t")
    assert store.exists()
    again = DenyList(tmp_path / "denied.txt", trusted_pem=pem(ca), crl_store=store)
    assert 77 in again and again.crl_fresh()
    # The restarted node also refuses a replay of an older CRL.
    with pytest.raises(ValueError, match="older"):
        again.set_crl(crl_at(key, ca, [], age=dt.timedelta(hours=1),
                              valid_for=dt.timedelta(days=1)), source="t")
    # A stored CRL from another CA is not used.
    other_key = ec.generate_private_key(ec.SECP256R1())
    assert 77 not in DenyList(tmp_path / "denied.txt",
                              trusted_pem=pem(ca_cert(other_key, "Other")), crl_store=store)


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
