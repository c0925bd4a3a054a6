"""AdminService: node facts, doctor, certificate status. Admin identities only."""

from __future__ import annotations

import datetime as dt

import grpc
import psycopg
from cryptography import x509

from tessera import __version__, doctor
from tessera.api._audit import AuditAdmin
from tessera.api._convert import dict_to_struct, identity_to_pb, timestamp
from tessera.api._peers_admin import PeerGrantAdmin
from tessera.api._ratelimit import rate_limit_status
from tessera.api._runtime import Runtime
from tessera.core.errors import FailedPrecondition, TesseraError, Unavailable
from tessera.pki import CertificateStatus, CertState, StepCAIssuer
from tessera.store import FollowStore
from tessera_client.pb import admin_pb2, admin_pb2_grpc

_LEVELS = {
    doctor.Level.GREEN: admin_pb2.DoctorCheck.STATUS_GREEN,
    doctor.Level.YELLOW: admin_pb2.DoctorCheck.STATUS_YELLOW,
    doctor.Level.RED: admin_pb2.DoctorCheck.STATUS_RED,
}


async def run_checks(rt: Runtime) -> list[doctor.Check]:
    """The doctor checks of a running node, against its live connections."""
    files = rt.server_files
    issuer = rt.certificates.issuer
    checks = await doctor.check_dependencies(doctor.Dependencies(
        dsn=rt.dsn, valkey_url=rt.valkey_url,
        certificates=[("certificate", files.cert, files.key)],
        renewals=rt.certificates.statuses(),  # node, admin, client
        stepca=issuer if isinstance(issuer, StepCAIssuer) else None,
        stepca_timeout_s=rt.cfg.ca.timeout_s))
    checks.append(rt.limiter.doctor_check())
    checks += [doctor.check_peer_certificate(st)
               for _, st in sorted(rt.peer_renewal.refresh().items())]
    try:
        follows = await FollowStore(rt.pool).list()
    except (psycopg.Error, OSError):
        follows = []  # the postgresql check above already says why
    checks += [doctor.check_follow(f) for f in follows if f.enabled]
    return checks


class AdminServicer(AuditAdmin, PeerGrantAdmin, admin_pb2_grpc.AdminServiceServicer):
    """Administers the node."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def Reload(
        self, request: admin_pb2.ReloadRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ReloadResponse:
        if self.rt.reloader is None:
            raise FailedPrecondition("this node cannot reload its configuration",
                                     reason="NO_CONFIG_SOURCE")
        result = await self.rt.reloader.reload_node(self.rt.pool)
        return admin_pb2.ReloadResponse(
            reloaded=result.reloaded, not_reloaded=result.not_reloaded,
            processes_applied=result.processes_applied,
            processes_missing=result.processes_missing or [])

    async def GetRateLimitStatus(
        self, request: admin_pb2.GetRateLimitStatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RateLimitStatus:
        return await rate_limit_status(self.rt, request.subject)

    async def GetNodeInfo(
        self, request: admin_pb2.GetNodeInfoRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.NodeInfo:
        return admin_pb2.NodeInfo(
            identity=identity_to_pb(self.rt.identity), version=__version__,
            tier=self.rt.cfg.tier, listen_address=self.rt.listen_address,
            embedding_dimension=self.rt.cfg.store.embedding_dimension,
            start_time=timestamp(self.rt.started_at), schema_version=self.rt.schema_version,
        )

    async def Doctor(
        self, request: admin_pb2.DoctorRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DoctorResponse:
        checks = await run_checks(self.rt)
        return admin_pb2.DoctorResponse(checks=[
            admin_pb2.DoctorCheck(name=c.name, status=_LEVELS[c.level], message=c.message,
                                  details=dict_to_struct(c.details))
            for c in checks
        ])

    async def GetCertificateStatus(
        self, request: admin_pb2.GetCertificateStatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CertificateStatus:
        certs = self.rt.certificates
        status = certs.server_status() if certs is not None else None
        if status is None:
            return _static_status(self.rt)
        return certificate_status_to_pb(status)

    async def RotateCertificate(
        self, request: admin_pb2.RotateCertificateRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CertificateStatus:
        certs = self.rt.certificates
        if certs is None or certs.server_status() is None:
            raise FailedPrecondition(
                "the node serves fixed certificate files (tls.cert_file); replace them and "
                "restart, or configure ca.url", reason="NO_ISSUER")
        try:
            status = await certs.rotate()
        except TesseraError as exc:
            # Recorded as DEGRADED already; the caller gets the (secret-free) reason.
            raise Unavailable(f"certificate rotation failed: {exc.message}",
                              reason="ROTATION_FAILED") from None
        assert status is not None
        return certificate_status_to_pb(status)


_STATES = {
    CertState.HEALTHY: admin_pb2.CertificateStatus.STATE_HEALTHY,
    CertState.DEGRADED: admin_pb2.CertificateStatus.STATE_DEGRADED,
    CertState.EXPIRED: admin_pb2.CertificateStatus.STATE_EXPIRED,
}


def certificate_status_to_pb(status: CertificateStatus) -> admin_pb2.CertificateStatus:
    """Domain status to protobuf."""
    return admin_pb2.CertificateStatus(
        serial=format(status.serial, "x"), sans=list(status.sans),
        not_before=timestamp(status.not_before), not_after=timestamp(status.not_after),
        renew_time=timestamp(status.renew_at), state=_STATES[status.state],
        issuer=status.issuer, last_error=status.last_error,
    )


def _static_status(rt: Runtime) -> admin_pb2.CertificateStatus:
    """Status of fixed certificate files that nothing renews."""
    leaf = rt.credentials.material.leaf()
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    sans = [str(v.value) for v in san]
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    expired = leaf.not_valid_after_utc <= dt.datetime.now(dt.UTC)
    return admin_pb2.CertificateStatus(
        serial=format(leaf.serial_number, "x"), sans=sans,
        not_before=timestamp(leaf.not_valid_before_utc),
        not_after=timestamp(leaf.not_valid_after_utc),
        renew_time=timestamp(leaf.not_valid_before_utc + lifetime * 2 / 3),
        state=admin_pb2.CertificateStatus.STATE_EXPIRED if expired
        else admin_pb2.CertificateStatus.STATE_HEALTHY,
        issuer=rt.issuer_kind,
    )
