"""The node's certificate lifecycle against a real step-ca 0.19.

Enrolment (provisioner key, bootstrap token), renewal under load with no dropped call,
revocation through the deny list, CRLs, the CA going away and coming back, and no
secret in any log line or error message.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tessera import cli, config
from tessera.app import Node, start_node
from tessera.core.errors import ConfigError
from tessera.core.paths import NodePaths
from tessera.pki import DevCA, SpiffeId
from tessera.pki._enrol import Enrolment, enrol
from tessera.pki._identity import IdentityKind
from tessera.pki._node import ensure_enrolled, make_stepca_issuer
from tessera.pki._renewal import ManagedCertificate
from tessera.pki.stepca._client import StepCAUnauthorized, StepCAUnavailable
from tessera.pki.stepca._config import StepCAFiles, init_stepca
from tessera.pki.stepca._issuer import StepCAIssuer
from tessera_client import AsyncClient, Client, Credentials
from tessera_client.pb import admin_pb2, admin_pb2_grpc, query_pb2
from tests.fixtures.calls import reason_of
from tests.fixtures.stepca import (
    RunningStepCA,
    build_stepca,
    free_loopback_port,
    wait_healthy,
)
from tests.fixtures.waiting import wait_until

TRUST_DOMAIN = "tessera.local"
#: Renew at 60 % of the lifetime: step-ca backdates by 1 min, so its 60 s certificates
#: live 120 s and are renewed every 6-12 s (jitter included).
FAST_RENEW = 0.6


# ----------------------------------------------------------------------- helpers


def node_config(data_dir: Path, ca_url: str, files: StepCAFiles, **ca: Any) -> config.Config:
    """A node in the embedded tier whose certificates come from step-ca."""
    overrides: dict[str, Any] = {
        "node.data_dir": str(data_dir),
        # Named, as these tests expect the identity .../node/tessera (the default name is
        # derived from the host name since issue 12).
        "node.name": "tessera",
        "node.listen_address": "127.0.0.1:0",
        "node.shutdown_grace_s": "1",
        "store.embedding_dimension": "4",
        "ca.url": ca_url,
        "ca.root_fingerprint": files.root_fingerprint,
        "ca.provisioner_name": files.provisioner_name,
        "ca.provisioner_key_file": str(files.provisioner_key),
    }
    overrides.update({f"ca.{k}": v for k, v in ca.items()})
    return config.load(None, environ={}, overrides=overrides)


def node_files(cfg: config.Config) -> NodePaths:
    """The credential files of a node's data directory."""
    p = NodePaths(cfg.node.data_dir)
    return p


@dataclass(frozen=True)
class ClientCert:
    """A client identity issued by step-ca through the node's enrolment code."""

    chain_pem: bytes
    key_pem: bytes
    root_pem: bytes

    @property
    def serial(self) -> int:
        """Serial of the leaf."""
        return x509.load_pem_x509_certificates(self.chain_pem)[0].serial_number

    def channel(self, address: str) -> grpc.aio.Channel:
        """A new mTLS channel (a new TLS handshake on first use).

        Its own subchannel pool: by default gRPC shares one connection among channels of
        the same target and settings in a process, and there would be no new handshake.
        """
        creds = grpc.ssl_channel_credentials(self.root_pem, self.key_pem, self.chain_pem)
        return grpc.aio.secure_channel(address, creds,
                                       options=[("grpc.use_local_subchannel_pool", 1)])


async def issue_client(
    stepca: RunningStepCA, tmp: Path, name: str, *, kind: IdentityKind = IdentityKind.ADMIN,
    ttl: dt.timedelta | None = dt.timedelta(hours=1),
) -> ClientCert:
    """Enrol an admin (or client) identity with the provisioner key."""
    issuer = await StepCAIssuer.from_config(
        url=stepca.url, root_fingerprint=stepca.fingerprint,
        provisioner_name=stepca.files.provisioner_name,
        provisioner_key_file=str(stepca.files.provisioner_key))
    try:
        from tessera.core.paths import CredentialFiles

        files = CredentialFiles(tmp / f"{name}.crt", tmp / f"{name}.key", tmp / f"{name}-ca.crt")
        await enrol(issuer, files, Enrolment(SpiffeId(TRUST_DOMAIN, kind, name)), ttl=ttl)
    finally:
        await issuer.aclose()
    return ClientCert(files.cert.read_bytes(), files.key.read_bytes(), stepca.root_pem)


async def node_info(channel: grpc.aio.Channel) -> admin_pb2.NodeInfo:
    """One admin call."""
    stub = admin_pb2_grpc.AdminServiceStub(channel)
    return await stub.GetNodeInfo(admin_pb2.GetNodeInfoRequest(), timeout=5)


async def cert_status(channel: grpc.aio.Channel) -> admin_pb2.CertificateStatus:
    """GetCertificateStatus."""
    stub = admin_pb2_grpc.AdminServiceStub(channel)
    return await stub.GetCertificateStatus(admin_pb2.GetCertificateStatusRequest(), timeout=5)


def served_serial(port: int, client: ClientCert, tmp: Path) -> int:
    """The serial the node presents in a fresh TLS handshake."""
    crt, key = tmp / "probe.crt", tmp / "probe.key"
    crt.write_bytes(client.chain_pem)
    key.write_bytes(client.key_pem)
    key.chmod(0o600)
    ctx = ssl.create_default_context(cadata=client.root_pem.decode())
    ctx.load_cert_chain(crt, key)
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock, \
            ctx.wrap_socket(sock, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number




def intermediate_key(files: StepCAFiles) -> ec.EllipticCurvePrivateKey:
    """The CA's intermediate key (the test plays the CA's operator)."""
    key = serialization.load_pem_private_key(
        files.intermediate_key.read_bytes(), password=files.password_file.read_bytes().strip())
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def make_crl(files: StepCAFiles, serials: list[int], *,
             age: dt.timedelta = dt.timedelta(minutes=1)) -> bytes:
    """A CRL signed by step-ca's intermediate, listing `serials`, issued `age` ago."""
    issuer = x509.load_pem_x509_certificate(files.intermediate_cert.read_bytes())
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer.subject)
               .last_update(now - age).next_update(now + dt.timedelta(hours=1)))
    for s in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(s).revocation_date(now).build())
    crl = builder.sign(intermediate_key(files), hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)


def expired_cert_from_same_ca(files: StepCAFiles, name: str) -> ClientCert:
    """An admin certificate from step-ca's own intermediate that expired an hour ago."""
    inter = x509.load_pem_x509_certificate(files.intermediate_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    uri = SpiffeId(TRUST_DOMAIN, IdentityKind.ADMIN, name).uri
    cert = (
        x509.CertificateBuilder().subject_name(
            x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]))
        .issuer_name(inter.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=2)).not_valid_after(now - dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), False)
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        .sign(intermediate_key(files), hashes.SHA256())
    )
    chain = cert.public_bytes(serialization.Encoding.PEM) + inter.public_bytes(
        serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return ClientCert(chain, key_pem, files.root_cert.read_bytes())


class DedicatedStepCA:
    """A step-ca this test may stop and start (the session one stays up)."""

    def __init__(self, directory: Path) -> None:
        self.binary = build_stepca()
        port = free_loopback_port()
        self.files = init_stepca(
            directory, address=f"127.0.0.1:{port}", provisioner_name="tessera-test",
            default_cert_ttl=dt.timedelta(seconds=60), min_cert_ttl=dt.timedelta(seconds=30),
            max_cert_ttl=dt.timedelta(hours=24))
        self.log_path = directory / "step-ca.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start and wait until healthy; fail (never skip) if it cannot start."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(self.binary), *self.files.step_ca_args()], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(self.files.ca_url, self.files.root_cert.read_bytes(), timeout_s=30,
                         proc=self.proc)
        except (TimeoutError, RuntimeError) as exc:
            pytest.fail(f"dedicated step-ca did not start: {exc}", pytrace=False)

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def running(self) -> RunningStepCA:
        """As the session fixture's type, for the helpers."""
        return RunningStepCA(self.files.ca_url, self.files, self.files.root_cert.read_bytes(),
                             self.log_path)


async def wait_for(predicate: Any, timeout_s: float, what: str, step_s: float = 0.25) -> Any:
    """Poll an async predicate until it returns a truthy value."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await predicate()
        if last:
            return last
        await asyncio.sleep(step_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def crl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the shared node reads its CRL (absent until a test writes it)."""
    return tmp_path_factory.mktemp("crl") / "revoked.crl"


@pytest.fixture(scope="module")
async def stepca_node(
    stepca: RunningStepCA, tmp_path_factory: pytest.TempPathFactory, crl_path: Path
) -> AsyncIterator[Node]:
    """A node enrolled from the session step-ca, renewing fast, honouring a CRL file."""
    # A node with a CRL configured refuses to start without one: begin with an empty CRL.
    await asyncio.to_thread(crl_path.write_bytes,
                            make_crl(stepca.files, [], age=dt.timedelta(minutes=5)))
    cfg = node_config(tmp_path_factory.mktemp("node"), stepca.url, stepca.files,
                      renew_fraction=str(FAST_RENEW), crl_file=str(crl_path),
                      crl_refresh_s="0.5")
    node = await start_node(cfg)
    try:
        yield node
    finally:
        await node.stop(0.5)


@pytest.fixture
def dedicated_stepca(tmp_path: Path) -> Iterator[DedicatedStepCA]:
    """A private step-ca, stopped at the end of the test."""
    ca = DedicatedStepCA(tmp_path / "dedicated-ca")
    ca.start()
    try:
        yield ca
    finally:
        ca.stop()


# ------------------------------------------------------------------------- tests


async def test_node_enrols_with_the_provisioner_key_and_stores_a_private_key(
    stepca: RunningStepCA, tmp_path: Path
) -> None:
    cfg = node_config(tmp_path / "data", stepca.url, stepca.files)
    files = node_files(cfg)
    issuer = await make_stepca_issuer(cfg)
    try:
        enrolled = await ensure_enrolled(cfg, files, issuer)
        again = await ensure_enrolled(cfg, files, issuer)
    finally:
        await issuer.aclose()

    assert enrolled == ["node", "admin", "client"]
    assert again == []  # valid certificates are kept
    leaf = x509.load_pem_x509_certificates(files.server.cert.read_bytes())[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{TRUST_DOMAIN}/node/tessera"]
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert files.server.key.stat().st_mode & 0o777 == 0o600
    assert files.server.ca.read_bytes() == stepca.root_pem
    key = serialization.load_pem_private_key(files.server.key.read_bytes(), None)
    assert leaf.public_key() == key.public_key()


async def test_node_enrols_with_a_bootstrap_token_and_the_same_token_is_refused_again(
    stepca: RunningStepCA, tmp_path: Path
) -> None:
    sans = [f"spiffe://{TRUST_DOMAIN}/node/tessera", "localhost", "127.0.0.1"]
    token_file = tmp_path / "token"
    token_file.write_text(stepca.ott("tessera", sans))
    first = node_config(tmp_path / "first", stepca.url, stepca.files,
                        provisioner_key_file="", bootstrap_token_file=str(token_file))
    issuer = await make_stepca_issuer(first)
    try:
        assert await ensure_enrolled(first, node_files(first), issuer) == ["node"]
    finally:
        await issuer.aclose()
    leaf = x509.load_pem_x509_certificates(node_files(first).server.cert.read_bytes())[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(str(v.value) for v in san) == sorted(sans)

    second = node_config(tmp_path / "second", stepca.url, stepca.files,
                         provisioner_key_file="", bootstrap_token_file=str(token_file))
    issuer = await make_stepca_issuer(second)
    try:
        with pytest.raises(StepCAUnauthorized):
            await ensure_enrolled(second, node_files(second), issuer)
    finally:
        await issuer.aclose()
    assert not node_files(second).server.cert.exists()


async def test_node_renews_three_times_under_load_without_a_failed_call(
    stepca: RunningStepCA, stepca_node: Node, tmp_path: Path
) -> None:
    admin = await issue_client(stepca, tmp_path, "driver")
    address = stepca_node.address
    failures: list[str] = []
    calls = 0
    served: list[int] = []
    stop = asyncio.Event()

    async def persistent() -> None:
        nonlocal calls
        async with admin.channel(address) as channel:
            while not stop.is_set():
                try:
                    await node_info(channel)
                    calls += 1
                except grpc.aio.AioRpcError as exc:
                    failures.append(f"persistent: {exc.code().name} {exc.details()}")
                await asyncio.sleep(0.01)

    async def fresh_handshakes() -> None:
        nonlocal calls
        while not stop.is_set():
            try:
                async with admin.channel(address) as channel:
                    await node_info(channel)
                    calls += 1
            except grpc.aio.AioRpcError as exc:
                failures.append(f"fresh: {exc.code().name} {exc.details()}")
            serial = await asyncio.to_thread(served_serial, stepca_node.port, admin, tmp_path)
            if not served or served[-1] != serial:
                served.append(serial)
            await asyncio.sleep(0.2)

    drivers = [asyncio.create_task(persistent()), asyncio.create_task(fresh_handshakes())]
    manager = stepca_node.certificates.managed["node"]  # type: ignore[union-attr]
    start_renewals = manager.renewals
    try:
        async def renewed_thrice() -> bool:
            return manager.renewals - start_renewals >= 3 and len(served) >= 4
        await wait_for(renewed_thrice, 100, "three renewals seen in TLS handshakes", 0.5)
    finally:
        stop.set()
        await asyncio.gather(*drivers)

    assert failures == []
    assert calls > 100
    assert len(set(served)) >= 4
    async with admin.channel(address) as channel:
        status = await cert_status(channel)
    assert status.state == admin_pb2.CertificateStatus.STATE_HEALTHY
    assert status.issuer == "step-ca"
    assert int(status.serial, 16) == served[-1]
    assert f"spiffe://{TRUST_DOMAIN}/node/tessera" in status.sans
    ok = stepca_node.metrics.registry.get_sample_value(
        "tessera_certificate_renewals_total", {"identity": "node", "result": "ok"})
    assert ok is not None and ok >= 3


#: Callers each opening a new channel (a new TLS handshake) for every call.
SWARM = 64


async def test_a_renewal_amid_64_callers_making_new_handshakes_fails_no_call(
    stepca: RunningStepCA, tmp_path: Path
) -> None:
    """A renewal triggered at a known moment, while 64 callers each keep opening a fresh
    mTLS connection per call: no call fails before, during or after the swap, and new
    handshakes are served the new certificate."""
    # A node of its own with the default renewal schedule: the renewal below is the test's.
    node = await start_node(node_config(tmp_path / "data", stepca.url, stepca.files))
    try:
        admin = await issue_client(stepca, tmp_path, "swarm")
        assert node.certificates is not None
        manager = node.certificates.managed["node"]
        cert_file = node_files(node.runtime.cfg).server.cert
        before = await asyncio.to_thread(served_serial, node.port, admin, tmp_path)
        failures: list[str] = []
        calls = [0] * SWARM
        after = [0] * SWARM
        renewed = asyncio.Event()
        stop = asyncio.Event()

        async def caller(i: int) -> None:
            while not stop.is_set():
                started_after = renewed.is_set()
                try:
                    async with admin.channel(node.address) as channel:
                        await node_info(channel)
                except grpc.aio.AioRpcError as exc:
                    failures.append(f"{exc.code().name} {exc.details()}")
                    continue
                calls[i] += 1
                if started_after:
                    after[i] += 1  # a handshake begun once the renewal had completed

        callers = [asyncio.create_task(caller(i)) for i in range(SWARM)]
        try:
            await wait_until(lambda: min(calls) >= 2 or failures,
                             "every caller is making calls", timeout_s=120)
            renewals = manager.renewals
            status = await manager.renew_now()  # amid the handshakes
            renewed.set()
            await wait_until(lambda: min(after) >= 2 or failures,
                             "every caller made new handshakes after the renewal",
                             timeout_s=120)
        finally:
            stop.set()
            await asyncio.gather(*callers)
        assert failures == [], failures[:5]
        assert manager.renewals > renewals and status.serial != before
        now_on_disk = x509.load_pem_x509_certificates(cert_file.read_bytes())[0].serial_number
        served = await asyncio.to_thread(served_serial, node.port, admin, tmp_path)
        # The renewed certificate (or a later scheduled one), never the one from before.
        assert served == now_on_disk and served != before
        async with admin.channel(node.address) as channel:
            assert int((await cert_status(channel)).serial, 16) == served
    finally:
        await node.stop(0.5)


async def test_clients_open_across_three_renewals_of_their_certificate_never_fail_a_call(
    stepca_node: Node,
) -> None:
    """A long-lived sync and asyncio client on the node's renewed admin/client files."""
    pki = NodePaths(stepca_node.runtime.cfg.node.data_dir).pki
    assert stepca_node.certificates is not None
    managed = stepca_node.certificates.managed
    first_client = x509.load_pem_x509_certificates((pki / "client.crt").read_bytes())[0]
    first_admin = x509.load_pem_x509_certificates((pki / "admin.crt").read_bytes())[0]
    start = {n: managed[n].renewals for n in ("admin", "client")}
    address = stepca_node.address
    stop = threading.Event()
    failures: list[str] = []
    calls = {"async": 0, "sync": 0}

    def sync_driver() -> int:
        creds = Credentials.from_files(pki / "ca.crt", pki / "admin.crt", pki / "admin.key")
        with Client(address, creds, server_name="localhost", reload_interval_s=0.2) as c:
            while not stop.is_set():
                try:
                    c.admin.GetNodeInfo(admin_pb2.GetNodeInfoRequest(), timeout=5)
                    calls["sync"] += 1
                except grpc.RpcError as exc:
                    failures.append(f"sync: {exc.code().name} {exc.details()}")
                time.sleep(0.01)
            return c.channel.generation

    async def async_driver() -> int:
        creds = Credentials.from_files(pki / "ca.crt", pki / "client.crt", pki / "client.key")
        async with AsyncClient(address, creds, server_name="localhost",
                               reload_interval_s=0.2) as c:
            while not stop.is_set():
                try:
                    await c.query.ListResources(query_pb2.ListResourcesRequest(
                        workspace="w"), timeout=5)
                    calls["async"] += 1
                except grpc.aio.AioRpcError as exc:
                    failures.append(f"async: {exc.code().name} {exc.details()}")
                await asyncio.sleep(0.01)
            return c.channel.generation

    sync_task = asyncio.create_task(asyncio.to_thread(sync_driver))
    async_task = asyncio.create_task(async_driver())
    try:
        async def renewed_past_first_expiry() -> bool:
            now = dt.datetime.now(dt.UTC)
            return all(managed[n].renewals - start[n] >= 3 for n in start) and \
                now > max(first_client.not_valid_after_utc, first_admin.not_valid_after_utc) \
                + dt.timedelta(seconds=2)
        await wait_for(renewed_past_first_expiry, 150,
                       "three renewals of the admin and client certificates and their "
                       "first certificates expired", 0.5)
    finally:
        stop.set()
        generations = await asyncio.gather(sync_task, async_task)

    assert failures == []
    assert calls["sync"] > 50 and calls["async"] > 50
    print(f"clients across renewals: {calls} calls, channel generations {generations}, "
          f"{len(failures)} failed")
    # Each client followed every renewal onto a new channel.
    assert all(g >= 3 for g in generations), generations


async def test_revoked_certificate_can_neither_renew_nor_call_even_on_an_open_channel(
    stepca: RunningStepCA, stepca_node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = await issue_client(stepca, tmp_path, "victim")
    async with victim.channel(stepca_node.address) as channel:
        await node_info(channel)  # the channel is open and works

        for key, value in {
            "TESSERA_NODE_DATA_DIR": str(stepca_node.runtime.cfg.node.data_dir),
            "TESSERA_CA_URL": stepca.url,
            "TESSERA_CA_ROOT_FINGERPRINT": stepca.fingerprint,
            "TESSERA_CA_PROVISIONER_NAME": stepca.files.provisioner_name,
            "TESSERA_CA_PROVISIONER_KEY_FILE": str(stepca.files.provisioner_key),
        }.items():
            monkeypatch.setenv(key, value)
        code = await asyncio.to_thread(
            cli.main, ["certs", "revoke", str(victim.serial), "--reason", "test"])
        assert code == 0

        async def refused() -> str:
            try:
                await node_info(channel)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.UNAUTHENTICATED
                return reason_of(exc)
            return ""

        # The node notices the deny-list file within a second.
        assert await wait_for(refused, 5, "the revoked certificate to be refused") == \
            "CERT_REVOKED"

    issuer = await make_stepca_issuer(stepca_node.runtime.cfg)
    try:
        with pytest.raises(StepCAUnauthorized):
            await issuer.renew(victim.chain_pem, victim.key_pem)
    finally:
        await issuer.aclose()


async def test_a_revoked_own_certificate_heals_at_once_with_a_new_key_unless_decommissioned(
    stepca: RunningStepCA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = node_config(tmp_path / "data", stepca.url, stepca.files)
    for key, value in {
        "TESSERA_NODE_DATA_DIR": str(cfg.node.data_dir), "TESSERA_CA_URL": stepca.url,
        "TESSERA_CA_ROOT_FINGERPRINT": stepca.fingerprint,
        "TESSERA_CA_PROVISIONER_NAME": stepca.files.provisioner_name,
        "TESSERA_CA_PROVISIONER_KEY_FILE": str(stepca.files.provisioner_key),
    }.items():
        monkeypatch.setenv(key, value)
    prober = await issue_client(stepca, tmp_path, "prober")
    node = await start_node(cfg)
    pki = NodePaths(cfg.node.data_dir).pki
    assert node.certificates is not None
    managed = node.certificates.managed

    def held(name: str) -> tuple[int, bytes]:
        leaf = x509.load_pem_x509_certificates((pki / f"{name}.crt").read_bytes())[0]
        return leaf.serial_number, (pki / f"{name}.key").read_bytes()

    async def revoke(*argv: str) -> str:
        capsys.readouterr()
        assert await asyncio.to_thread(cli.main, ["certs", "revoke", *argv]) == 0
        return capsys.readouterr().out

    try:
        creds = Credentials.from_files(pki / "ca.crt", pki / "admin.crt", pki / "admin.key")
        async with AsyncClient(node.address, creds, server_name="localhost",
                               reload_interval_s=0.2) as admin:
            await admin.admin.GetNodeInfo(admin_pb2.GetNodeInfoRequest(), timeout=5)

            # The node's server certificate and its admin certificate, revoked by the CLI:
            # each is re-enrolled with a new key, and the new one is what is used.
            for name in ("node", "admin"):
                serial, key = held(name)
                out = await revoke(format(serial, "x"))
                assert f"re-enrols {name} with a new key" in out

                async def healed(name: str = name, serial: int = serial,
                                 key: bytes = key) -> bool:
                    now_serial, now_key = held(name)
                    return now_serial != serial and now_key != key
                await wait_for(healed, 30, f"{name} re-enrolled after its revocation")
            new_node_serial = held("node")[0]

            async def serves_new() -> bool:
                return await asyncio.to_thread(served_serial, node.port, prober,
                                               tmp_path) == new_node_serial
            await wait_for(serves_new, 10, "the re-enrolled server certificate served")

            async def admin_works() -> bool:
                try:
                    await admin.admin.GetNodeInfo(admin_pb2.GetNodeInfoRequest(), timeout=5)
                except grpc.aio.AioRpcError:
                    return False
                return True
            await wait_for(admin_works, 10, "the open admin client to work again")
            assert admin.channel.credentials.cert_pem == (pki / "admin.crt").read_bytes()

            # A revoke that lost the race with a renewal names the earlier serial: it
            # says a newer certificate is in force, and the node keeps that one.
            earlier_node_serial = new_node_serial
            new_node_serial = (await managed["node"].renew_now()).serial
            out = await revoke(format(earlier_node_serial, "x"))
            assert f"a newer one, serial {new_node_serial:x}, is in force" in out

            # Revoked at the CA only: the renewal is refused as revoked, and re-enrols.
            serial, key = held("client")
            issuer = await make_stepca_issuer(cfg)
            try:
                await issuer.revoke(serial, reason="test")
            finally:
                await issuer.aclose()
            status = await managed["client"].renew_now()
            assert status.serial != serial and held("client")[1] != key
            assert status.previous_serials[0] == serial

            # --decommission: the node sees the revocation and does not heal it.
            serial, _ = held("client")
            out = await revoke(format(serial, "x"), "--decommission")
            assert "decommissioned: the node will not re-enrol it" in out

            async def refused_to_heal() -> bool:
                return "decommissioned" in managed["client"].status().last_error
            await wait_for(refused_to_heal, 30, "the node to see the decommissioned serial")
            assert held("client")[0] == serial
            assert held("node")[0] == new_node_serial
    finally:
        await node.stop(0.5)


async def test_a_server_certificate_past_its_expiry_is_never_served(tmp_path: Path) -> None:
    """When no renewed certificate arrived in time, new handshakes get no expired one."""
    from tessera.core.paths import CredentialFiles
    from tessera.pki import ReloadableServerCredentials, TlsMaterial

    ca = DevCA(tmp_path / "ca", TRUST_DOMAIN)
    server = CredentialFiles(tmp_path / "s.crt", tmp_path / "s.key", tmp_path / "ca.crt")
    ca.issue_files(server, SpiffeId(TRUST_DOMAIN, IdentityKind.NODE, "short"),
                   ttl=dt.timedelta(seconds=3), dns_names=("localhost",))
    material = TlsMaterial.read(server.cert, server.key, server.ca)
    short = material.leaf()
    creds = ReloadableServerCredentials(material)
    srv = grpc.aio.server()
    port = srv.add_secure_port("127.0.0.1:0", creds.server_credentials())
    await srv.start()

    def presented() -> x509.Certificate:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # to see what is presented, trusted or not
        ctx.set_alpn_protocols(["h2"])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock, \
                ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)

    try:
        # Handshakes fail at the client's certificate check (no client certificate
        # here), after the server presented its own: that is all this looks at.
        first = await asyncio.to_thread(_presented_or_none, presented)
        assert first is not None and first.serial_number == short.serial_number

        async def expired() -> bool:
            return dt.datetime.now(dt.UTC) > short.not_valid_after_utc
        await wait_for(expired, 30, "the short certificate to expire", 0.2)
        after = await asyncio.to_thread(_presented_or_none, presented)
        assert after is not None and after.serial_number != short.serial_number
        assert after.subject.rfc4514_string() == "CN=tessera certificate expired"
    finally:
        await srv.stop(0)


def _presented_or_none(probe: Any) -> x509.Certificate | None:
    try:
        cert: x509.Certificate = probe()
    except (ssl.SSLError, OSError):
        return None
    return cert


async def test_expired_or_foreign_certificates_cannot_call(
    stepca: RunningStepCA, stepca_node: Node, tmp_path: Path
) -> None:
    good = await issue_client(stepca, tmp_path, "good")
    async with good.channel(stepca_node.address) as channel:
        await node_info(channel)

    expired = expired_cert_from_same_ca(stepca.files, "late")
    foreign_ca = DevCA(tmp_path / "other-ca", TRUST_DOMAIN)
    from tessera.core.paths import CredentialFiles

    f = CredentialFiles(tmp_path / "f.crt", tmp_path / "f.key", tmp_path / "f-ca.crt")
    foreign_ca.issue_files(f, SpiffeId(TRUST_DOMAIN, IdentityKind.ADMIN, "admin"),
                           ttl=dt.timedelta(hours=1))
    foreign = ClientCert(f.cert.read_bytes(), f.key.read_bytes(), stepca.root_pem)

    for who in (expired, foreign):
        async with who.channel(stepca_node.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await node_info(channel)
        # Refused in the TLS handshake: the call never reaches the node's services.
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_crl_listing_a_client_refuses_its_next_call(
    stepca: RunningStepCA, stepca_node: Node, tmp_path: Path, crl_path: Path
) -> None:
    listed = await issue_client(stepca, tmp_path, "listed")
    other = await issue_client(stepca, tmp_path, "other")
    async with listed.channel(stepca_node.address) as channel:
        await node_info(channel)
        await asyncio.to_thread(crl_path.write_bytes, make_crl(stepca.files, [listed.serial]))

        async def refused() -> str:
            try:
                await node_info(channel)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.UNAUTHENTICATED
                return reason_of(exc)
            return ""

        assert await wait_for(refused, 5, "the CRL to be honoured") == "CERT_REVOKED"
    async with other.channel(stepca_node.address) as channel:
        await node_info(channel)  # only the listed serial is refused


async def test_ca_down_at_renewal_degrades_and_recovers_when_it_returns(
    dedicated_stepca: DedicatedStepCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = dedicated_stepca.running()
    cfg = node_config(tmp_path / "data", ca.url, ca.files, renew_fraction=str(FAST_RENEW))
    admin = await issue_client(ca, tmp_path, "operator")
    node = await start_node(cfg)
    try:
        first = node.certificates.server_status()  # type: ignore[union-attr]
        assert first is not None

        async def doctor_checks(channel: grpc.aio.Channel) -> dict[str, Any]:
            resp = await admin_pb2_grpc.AdminServiceStub(channel).Doctor(
                admin_pb2.DoctorRequest(), timeout=15)
            return {c.name: c for c in resp.checks}

        async with admin.channel(node.address) as channel:
            checks = await doctor_checks(channel)
        # Doctor sees the CA, and the renewal state of every local identity.
        assert checks["step-ca"].status == admin_pb2.DoctorCheck.STATUS_GREEN
        for name in ("certificate-renewal", "certificate-renewal:admin",
                     "certificate-renewal:client"):
            assert checks[name].status == admin_pb2.DoctorCheck.STATUS_GREEN, name
        dedicated_stepca.stop()
        async with admin.channel(node.address) as channel:
            # The CA's outage shows at once, from its /health, not after a renewal failed.
            checks = await doctor_checks(channel)
            assert checks["step-ca"].status == admin_pb2.DoctorCheck.STATUS_YELLOW
            assert "does not answer /health" in checks["step-ca"].message
            async def degraded() -> admin_pb2.CertificateStatus | None:
                st = await cert_status(channel)
                return st if st.state == admin_pb2.CertificateStatus.STATE_DEGRADED else None

            with caplog.at_level(logging.WARNING, logger="tessera"):
                st = await wait_for(degraded, 30, "DEGRADED while the CA is down")
            assert "StepCAUnavailable" in st.last_error
            assert "renewal failed" in caplog.text
            doctor = await admin_pb2_grpc.AdminServiceStub(channel).Doctor(
                admin_pb2.DoctorRequest(), timeout=10)
            renewal = [c for c in doctor.checks if c.name == "certificate-renewal"]
            assert renewal and renewal[0].status == admin_pb2.DoctorCheck.STATUS_YELLOW
            failed = node.metrics.registry.get_sample_value(
                "tessera_certificate_renewals_total", {"identity": "node", "result": "failed"})
            assert failed is not None and failed >= 1
            # Calls keep working on the current certificate meanwhile.
            await node_info(channel)
            # A restart while the CA is down still finds the pinned root (cached ca.crt).
            cached = await make_stepca_issuer(cfg)
            assert cached.roots_pem() == ca.root_pem
            await cached.aclose()

            # Renewal never cuts it close unnoticed: with less than 1/6 of the life left the
            # urgent gauge is 1, and the capped backoff made several attempts by then.
            def sample(name: str, labels: dict[str, str]) -> float:
                return node.metrics.registry.get_sample_value(name, labels) or 0.0

            async def urgent() -> bool:
                return sample("tessera_certificate_renewal_urgent", {"identity": "node"}) == 1
            await wait_for(urgent, 90, "the urgent-renewal gauge while the CA is down", 0.5)
            managed = node.certificates.managed["node"]  # type: ignore[union-attr]
            leaf = managed.status()
            assert leaf.not_after > dt.datetime.now(dt.UTC)  # raised before expiry
            assert sample("tessera_certificate_renewals_total",
                          {"identity": "node", "result": "failed"}) >= 4

            dedicated_stepca.start()

            async def healthy() -> admin_pb2.CertificateStatus | None:
                st = await cert_status(channel)
                return st if st.state == admin_pb2.CertificateStatus.STATE_HEALTHY else None

            st = await wait_for(healthy, 40, "HEALTHY after the CA returned")
            assert int(st.serial, 16) != first.serial
            assert st.last_error == ""
            assert sample("tessera_certificate_renewal_urgent", {"identity": "node"}) == 0
        async with admin.channel(node.address) as channel:
            await node_info(channel)  # a new handshake gets the renewed certificate
    finally:
        await node.stop(0.5)


async def test_rotate_certificate_renews_now_and_cli_status_reads_the_running_node(
    stepca: RunningStepCA, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = node_config(tmp_path / "data", stepca.url, stepca.files)
    node = await start_node(cfg)
    try:
        before = node.certificates.server_status()  # type: ignore[union-attr]
        assert before is not None
        monkeypatch.setenv("TESSERA_NODE_DATA_DIR", str(cfg.node.data_dir))
        monkeypatch.setenv("TESSERA_CA_URL", stepca.url)
        monkeypatch.setenv("TESSERA_CA_ROOT_FINGERPRINT", stepca.fingerprint)
        monkeypatch.setenv("TESSERA_CA_PROVISIONER_KEY_FILE", str(stepca.files.provisioner_key))
        monkeypatch.setenv("TESSERA_CA_PROVISIONER_NAME", stepca.files.provisioner_name)
        assert await asyncio.to_thread(cli.main, ["certs", "renew"]) == 0
        after = node.certificates.server_status()  # type: ignore[union-attr]
        assert after is not None and after.serial != before.serial
        capsys.readouterr()
        assert await asyncio.to_thread(cli.main, ["certs", "status"]) == 0
        out = capsys.readouterr().out
        assert f"serving serial {after.serial:x}, state healthy" in out
        assert f"spiffe://{TRUST_DOMAIN}/node/tessera" in out
    finally:
        await node.stop(0.5)


async def test_no_key_password_or_token_appears_in_logs_or_errors(
    stepca: RunningStepCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token = stepca.ott("tessera", [f"spiffe://{TRUST_DOMAIN}/node/tessera", "localhost"])
    token_file = tmp_path / "token"
    token_file.write_text(token)
    messages: list[str] = []
    with caplog.at_level(logging.DEBUG):
        cfg = node_config(tmp_path / "a", stepca.url, stepca.files)
        issuer = await make_stepca_issuer(cfg)
        files = node_files(cfg)
        try:
            await ensure_enrolled(cfg, files, issuer)
            managed = ManagedCertificate("node", files.server, issuer, can_reenrol=True)
            await managed.renew_now()
        finally:
            await issuer.aclose()
        for n in ("b", "c"):  # the token works once, then is refused
            c = node_config(tmp_path / n, stepca.url, stepca.files, provisioner_key_file="",
                            bootstrap_token_file=str(token_file))
            i = await make_stepca_issuer(c)
            try:
                await ensure_enrolled(c, node_files(c), i)
            except StepCAUnauthorized as exc:
                messages.append(str(exc))
            finally:
                await i.aclose()
        # The CA unreachable at renewal time: the recorded error is secret-free too.
        dead = StepCAIssuer(issuer.client.__class__(
            f"https://127.0.0.1:{free_loopback_port()}", stepca.root_pem))
        broken = ManagedCertificate("node", files.server, dead)
        with pytest.raises(StepCAUnavailable) as info:
            await broken.renew_now()
        messages += [str(info.value), broken.last_error]
        await dead.aclose()

    assert len(messages) == 3
    text = caplog.text + "\n".join(messages)
    assert "renewal failed" in text
    key_lines = [ln for ln in files.server.key.read_text().splitlines() if "-----" not in ln]
    secrets = {
        "provisioner key": stepca.provisioner_secret(),
        "CA password": stepca.files.password_file.read_text().strip(),
        "token": token,
        "token signature": token.rsplit(".", 1)[1],
        **{f"node key line {i}": ln for i, ln in enumerate(key_lines)},
    }
    for what, secret in secrets.items():
        assert secret not in text, f"{what} leaked"


class CrlServer:
    """A plain-http CRL distribution point on loopback that can be taken down."""

    def __init__(self, body: bytes) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/intermediate.crl"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop answering; the port is closed."""
        self.server.shutdown()
        self.server.server_close()


async def test_restart_keeps_crl_revocations_while_the_crl_url_is_down(
    stepca: RunningStepCA, tmp_path: Path
) -> None:
    listed = await issue_client(stepca, tmp_path, "crl-listed")
    other = await issue_client(stepca, tmp_path, "crl-other")
    crl_server = CrlServer(make_crl(stepca.files, [listed.serial]))
    cfg = node_config(tmp_path / "data", stepca.url, stepca.files, crl_url=crl_server.url,
                      crl_refresh_s="0", timeout_s="3")

    async def assert_denied(node: Node) -> None:
        async with listed.channel(node.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await node_info(channel)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert reason_of(info.value) == "CERT_REVOKED"
        async with other.channel(node.address) as channel:
            await node_info(channel)

    try:
        node = await start_node(cfg)
        try:
            await assert_denied(node)
        finally:
            await node.stop(0.5)
    finally:
        crl_server.stop()
    # The CRL source is gone: the CRL stored by the first run keeps the serial refused.
    node = await start_node(cfg)
    try:
        await assert_denied(node)
    finally:
        await node.stop(0.5)


async def test_a_crl_url_unreachable_at_first_start_stops_the_start(
    stepca: RunningStepCA, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{free_loopback_port()}/intermediate.crl"
    cfg = node_config(tmp_path / "data", stepca.url, stepca.files, crl_url=url, timeout_s="2")
    with pytest.raises(ConfigError) as info:
        await start_node(cfg)
    assert info.value.message.startswith("ca.crl_url:")
    assert "\n" not in info.value.message and "refusing to start" in info.value.message


async def test_a_serial_revoked_through_one_replica_is_refused_by_another(
    stepca: RunningStepCA, tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer = await issue_client(stepca, tmp_path, "shared-peer")
    operator = await issue_client(stepca, tmp_path, "shared-operator")
    bystander = await issue_client(stepca, tmp_path, "shared-bystander")
    cfgs = []
    for name in ("a", "b"):
        cfg = node_config(tmp_path / name, stepca.url, stepca.files)
        cfgs.append(config.load(None, environ={}, overrides={
            "node.data_dir": str(cfg.node.data_dir), "node.listen_address": "127.0.0.1:0",
            "node.shutdown_grace_s": "1", "store.embedding_dimension": "4",
            "store.dsn": pg_dsn, "ca.url": stepca.url,
            "ca.root_fingerprint": stepca.files.root_fingerprint,
            "ca.provisioner_name": stepca.files.provisioner_name,
            "ca.provisioner_key_file": str(stepca.files.provisioner_key)}))
    a = await start_node(cfgs[0])
    try:
        b = await start_node(cfgs[1])
        try:
            async def refused_by_b(client: ClientCert) -> str:
                async with client.channel(b.address) as channel:
                    try:
                        await node_info(channel)
                    except grpc.aio.AioRpcError as exc:
                        return reason_of(exc)
                return ""

            for client in (peer, operator, bystander):
                assert await refused_by_b(client) == ""
            # As revoking a peer does: replica A's deny list only (LISTEN/NOTIFY carries it).
            assert a.certificates is not None
            a.certificates.deny_list.add([peer.serial])
            assert await wait_for(lambda: refused_by_b(peer), 10,
                                  "replica B to refuse a serial revoked through A") == \
                "CERT_REVOKED"

            # `tessera certs revoke` against A's data directory with the shared DSN.
            for key, value in {
                "TESSERA_NODE_DATA_DIR": str(cfgs[0].node.data_dir),
                "TESSERA_STORE_DSN": pg_dsn,
                "TESSERA_CA_URL": stepca.url,
                "TESSERA_CA_ROOT_FINGERPRINT": stepca.fingerprint,
                "TESSERA_CA_PROVISIONER_NAME": stepca.files.provisioner_name,
                "TESSERA_CA_PROVISIONER_KEY_FILE": str(stepca.files.provisioner_key),
            }.items():
                monkeypatch.setenv(key, value)
            printed = format(operator.serial, "x")  # as `certs status` prints it
            assert await asyncio.to_thread(cli.main, [
                "certs", "revoke", printed, *(["--hex"] if printed.isdigit() else [])]) == 0
            assert await wait_for(lambda: refused_by_b(operator), 10,
                                  "replica B to refuse a serial revoked by the CLI") == \
                "CERT_REVOKED"
            assert await refused_by_b(bystander) == ""

            # Written to A's file by another process without the DSN: A's periodic sync
            # (run here at once) pushes it to the table, and B hears of it.
            late = await issue_client(stepca, tmp_path, "shared-late")
            from tessera.pki import DenyList

            DenyList(NodePaths(cfgs[0].node.data_dir).pki / "denied_serials.txt").add(
                [late.serial])
            assert a.certificates.shared is not None
            await a.certificates.shared.sync()
            assert await wait_for(lambda: refused_by_b(late), 10,
                                  "replica B to refuse a serial pushed by A's sync") == \
                "CERT_REVOKED"
        finally:
            await b.stop(0.5)
        # A restarted replica loads the table at start, before its first call.
        b = await start_node(cfgs[1])
        try:
            assert b.certificates is not None
            assert {peer.serial, operator.serial} <= b.certificates.deny_list.shared
        finally:
            await b.stop(0.5)
    finally:
        await a.stop(0.5)
