"""AdminService: node facts, doctor, certificate status. Admin identities only."""

from __future__ import annotations

import datetime as dt
from typing import Any, NoReturn

import grpc
from cryptography import x509

from tessera import __version__, doctor
from tessera.errors import Unimplemented
from tessera.runtime import Runtime
from tessera.services._convert import dict_to_struct, identity_to_pb, timestamp
from tessera_client.pb import admin_pb2, admin_pb2_grpc

_LEVELS = {
    doctor.Level.GREEN: admin_pb2.DoctorCheck.STATUS_GREEN,
    doctor.Level.YELLOW: admin_pb2.DoctorCheck.STATUS_YELLOW,
    doctor.Level.RED: admin_pb2.DoctorCheck.STATUS_RED,
}


async def run_checks(rt: Runtime) -> list[doctor.Check]:
    """The doctor checks of a running node, against its live connections."""
    checks = await doctor.check_postgres(rt.extras["dsn"])
    checks.append(await doctor.check_valkey(rt.extras["valkey_url"]))
    files = rt.extras["server_files"]
    checks.append(doctor.check_certificate("certificate", files.cert, files.key))
    return checks


def _later(feature: str) -> Any:
    async def method(self: Any, request: Any, context: grpc.aio.ServicerContext) -> NoReturn:
        raise Unimplemented(f"{feature} is not implemented yet")

    return method


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """Administers the node."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    InvitePeer = _later("peering (InvitePeer)")
    EnrollPeer = _later("peering (EnrollPeer)")
    ListPeers = _later("peer management (ListPeers)")
    GetPeer = _later("peer management (GetPeer)")
    SuspendPeer = _later("peer management (SuspendPeer)")
    RevokePeer = _later("peer management (RevokePeer)")
    CreateGrant = _later("grants (CreateGrant)")
    ListGrants = _later("grants (ListGrants)")
    GetGrant = _later("grants (GetGrant)")
    RevokeGrant = _later("grants (RevokeGrant)")
    ListAuditRecords = _later("the audit log (ListAuditRecords)")
    VerifyAudit = _later("the audit log (VerifyAudit)")
    RotateCertificate = _later("certificate rotation (RotateCertificate)")
    Reload = _later("Reload")

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
        leaf = self.rt.credentials.material.leaf()
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
            issuer=self.rt.issuer_kind,
        )
