"""Peer certificates renew through the peer that issued them (AdminService.RenewPeerCertificate).

Real `tessera serve` processes; the issuing node signs with a real step-ca (short
certificates, so renewals come every ~20 s) or with its development CA.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from pathlib import Path

import grpc
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tessera.peering import OutboundPeer
from tessera.pki import IdentityKind, SpiffeId, new_key_and_csr
from tessera_client import AsyncClient, Credentials
from tessera_client.pb import admin_pb2, query_pb2, resources_pb2
from tests.fixtures.calls import bad_fields, put, reason_of, run_cli
from tests.fixtures.nodes import NodeFactory
from tests.fixtures.peers import Peering
from tests.fixtures.stepca import RunningStepCA, free_loopback_port

ALL = resources_pb2.Sources(scope=resources_pb2.Sources.SCOPE_ALL)
State = resources_pb2.SourceStatus


def stepca_env(stepca: RunningStepCA) -> dict[str, str]:
    """A node whose certificates (and the ones it signs for peers) come from step-ca."""
    return {"TESSERA_CA_URL": stepca.url,
            "TESSERA_CA_ROOT_FINGERPRINT": stepca.fingerprint,
            "TESSERA_CA_PROVISIONER_NAME": stepca.files.provisioner_name,
            "TESSERA_CA_PROVISIONER_KEY_FILE": str(stepca.files.provisioner_key)}


def leaf_of(path: Path) -> x509.Certificate:
    """The leaf certificate of a PEM chain file."""
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


async def wait_for(predicate: object, timeout_s: float, what: str) -> None:
    """Poll an async predicate until it holds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


async def renew(peer: OutboundPeer, csr_pem: bytes, *,
                creds: Credentials | None = None) -> admin_pb2.RenewPeerCertificateResponse:
    """One RenewPeerCertificate call as the peer (or with `creds`)."""
    async with AsyncClient(peer.address, creds or peer.credentials()) as c:
        resp: admin_pb2.RenewPeerCertificateResponse = await c.admin.RenewPeerCertificate(
            admin_pb2.RenewPeerCertificateRequest(csr_pem=csr_pem.decode()), timeout=10)
        return resp


async def refused(peer: OutboundPeer, csr_pem: bytes, *, creds: Credentials | None = None,
                  ) -> grpc.aio.AioRpcError:
    """The error of a RenewPeerCertificate call that must fail."""
    try:
        await renew(peer, csr_pem, creds=creds)
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the renewal was accepted")


async def test_a_to_b_calls_never_fail_across_three_renewals_of_the_peer_certificate(
    node_factory: NodeFactory, peering: Peering, stepca: RunningStepCA
) -> None:
    metrics_port = free_loopback_port()
    a = node_factory(name="a", env={"TESSERA_METRICS_LISTEN_ADDRESS":
                                    f"127.0.0.1:{metrics_port}"})
    b = node_factory(name="b", env=stepca_env(stepca))
    token = await peering.invite(b, "a")
    await peering.grant(b, "a", kinds=["task"], workspaces=["shared"])
    res = peering.join_cli(token, a)
    assert res.returncode == 0, res.stderr
    async with b.client() as c:
        await c.command.Execute(put("shared", "task", "t1", title="b's task"))

    cert_file = a.data_dir / "peers" / "b" / "client.crt"
    first = leaf_of(cert_file)
    serials = [first.serial_number]
    failures: list[str] = []
    calls = 0
    stop = asyncio.Event()

    async def drive() -> None:
        nonlocal calls
        async with a.client() as client:
            while not stop.is_set():
                resp = await client.query.ListResources(query_pb2.ListResourcesRequest(
                    workspace="shared", sources=ALL), timeout=10)
                status = {s.source: s for s in resp.source_status}
                if status["b"].state != State.STATE_OK:
                    failures.append(f"{status['b'].state}: {status['b'].message}")
                elif [r.id for r in resp.resources if r.source == "b"] != ["t1"]:
                    failures.append("b's row missing")
                calls += 1
                await asyncio.sleep(0.02)

    driver = asyncio.create_task(drive())
    try:
        async def renewed_thrice() -> bool:
            serial = await asyncio.to_thread(lambda: leaf_of(cert_file).serial_number)
            if serial != serials[-1]:
                serials.append(serial)
            now = dt.datetime.now(dt.UTC)
            return len(serials) >= 4 and now > first.not_valid_after_utc + dt.timedelta(seconds=2)
        await wait_for(renewed_thrice, 200, "three renewals of a's certificate on b")
    finally:
        stop.set()
        await driver

    assert failures == [], failures[:5]
    assert calls > 50
    print(f"A->B: {calls} fanned-out calls across {len(serials) - 1} peer-certificate "
          f"renewals, {len(failures)} failed")
    current = leaf_of(cert_file)
    san = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://tessera.local/node/a"]
    # b records the newest serial and its expiry, and audited each renewal. (a keeps
    # renewing: b records a serial just before a writes it, so compare a settled pair.)
    async with b.client("admin") as admin:
        async def b_records_what_a_holds() -> bool:
            nonlocal current, peer
            current = leaf_of(cert_file)
            peer = await admin.admin.GetPeer(admin_pb2.GetPeerRequest(name="a"))
            return int(peer.certificate_serial, 16) == current.serial_number
        peer = admin_pb2.Peer()
        await wait_for(b_records_what_a_holds, 20, "b's record to match a's certificate")
        records, page = [], ""
        while True:
            audit = await admin.admin.ListAuditRecords(admin_pb2.ListAuditRecordsRequest(
                peer="a", page_size=1000, page_token=page))
            records += audit.records
            page = audit.next_page_token
            if not page:
                break
    assert int(peer.certificate_serial, 16) == current.serial_number
    assert peer.certificate_expire_time.ToDatetime(dt.UTC) == current.not_valid_after_utc
    renewals = [r for r in records if r.method == "RenewPeerCertificate"]
    assert len(renewals) >= 3 and all(r.status_code == "OK" for r in renewals)

    # a shows the certificate it holds on b: `tessera peers list`, doctor, metrics.
    # Renewals go on meanwhile: what is shown is what the file held before or after.
    held_before = leaf_of(cert_file).serial_number
    out = (await asyncio.to_thread(
        run_cli, a, "peers", "list", "--json")).stdout
    joined = json.loads(out)["joined"]
    assert [j["name"] for j in joined] == ["b"]
    assert int(joined[0]["certificate_serial"], 16) in (
        held_before, leaf_of(cert_file).serial_number)
    assert joined[0]["certificate_expire_time"] and joined[0]["renewal_state"] == "healthy"
    async with a.client("admin") as admin:
        doctor = await admin.admin.Doctor(admin_pb2.DoctorRequest(), timeout=10)
    check = [c for c in doctor.checks if c.name == "peer-certificate:b"]
    assert check and check[0].status == admin_pb2.DoctorCheck.STATUS_GREEN
    async with httpx.AsyncClient(trust_env=False) as http:
        text = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
    assert 'tessera_peer_certificate_expiry_timestamp_seconds{peer="b"}' in text
    ok = [ln for ln in text.splitlines()
          if ln.startswith('tessera_peer_certificate_renewals_total{peer="b",result="ok"}')]
    assert ok and float(ok[0].split()[-1]) >= 3


async def test_peer_renewal_keeps_the_identity_and_is_refused_once_the_peering_ends(
    node_factory: NodeFactory, peering: Peering, tmp_path: Path
) -> None:
    b = node_factory(name="b")
    token = await peering.invite(b, "a")
    await peering.grant(b, "a", kinds=["task"], workspaces=["shared"])
    peer = await peering.join_dir(token, tmp_path / "a")
    me = SpiffeId("tessera.local", IdentityKind.NODE, "a")

    # Another identity, extra SANs, or a key other than P-256: INVALID_ARGUMENT on csr_pem.
    other = new_key_and_csr(SpiffeId("tessera.local", IdentityKind.NODE, "b"), common_name=False)
    wide = new_key_and_csr(me, dns_names=["localhost"], common_name=False)
    p384 = ec.generate_private_key(ec.SECP384R1())
    p384_csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(me.uri)]), critical=True)
                .sign(p384, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    for csr in (other.csr_pem, wide.csr_pem, p384_csr):
        err = await refused(peer, csr)
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert bad_fields(err) == ["csr_pem"]

    # A local admin cannot use it to get a peer certificate.
    admin = b.credentials("admin")
    err = await refused(peer, new_key_and_csr(me, common_name=False).csr_pem, creds=admin)
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED

    # The peer itself renews: same identity, new key and serial.
    first = peer.credentials()
    kc = new_key_and_csr(me, common_name=False)
    second_pem = (await renew(peer, kc.csr_pem)).certificate_chain_pem.encode()
    second = x509.load_pem_x509_certificates(second_pem)[0]
    assert second.serial_number != leaf_of(peer.cert).serial_number
    assert second.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.UniformResourceIdentifier) == [me.uri]
    second_creds = Credentials(first.ca_pem, second_pem, kc.key_pem)
    # As if that answer were lost: the first certificate may retry once; the undelivered
    # second certificate is then refused everywhere.
    await renew(peer, new_key_and_csr(me, common_name=False).csr_pem)
    err = await refused(peer, new_key_and_csr(me, common_name=False).csr_pem, creds=second_creds)
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED and reason_of(err) == "CERT_REVOKED"
    err = await refused(peer, new_key_and_csr(me, common_name=False).csr_pem)
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert reason_of(err) == "PEER_CERT_NOT_CURRENT"


async def test_peer_renewal_is_refused_without_a_live_grant_or_once_suspended(
    node_factory: NodeFactory, peering: Peering, tmp_path: Path
) -> None:
    b = node_factory(name="b")
    token = await peering.invite(b, "a")
    grant = await peering.grant(b, "a", kinds=["task"], workspaces=["shared"])
    peer = await peering.join_dir(token, tmp_path / "a")
    me = SpiffeId("tessera.local", IdentityKind.NODE, "a")
    async with b.client("admin") as admin:
        await admin.admin.RevokeGrant(admin_pb2.RevokeGrantRequest(name=grant.name))
    err = await refused(peer, new_key_and_csr(me, common_name=False).csr_pem)
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED and reason_of(err) == "NO_GRANT"

    await peering.grant(b, "a", kinds=["task"], workspaces=["shared"])
    async with b.client("admin") as admin:
        await admin.admin.SuspendPeer(admin_pb2.SuspendPeerRequest(name="a"))
    err = await refused(peer, new_key_and_csr(me, common_name=False).csr_pem)
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED and reason_of(err) == "PEER_SUSPENDED"

    async with b.client("admin") as admin:
        await admin.admin.RevokePeer(admin_pb2.RevokePeerRequest(name="a"))
    err = await refused(peer, new_key_and_csr(me, common_name=False).csr_pem)
    assert err.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
    assert reason_of(err) in ("PEER_REVOKED", "CERT_REVOKED")
