"""The enrolment listener: server-authenticated TLS, serving only EnrollPeer.

A joining node has no client certificate yet, so it cannot reach the mTLS listener. This
second listener asks for none and serves one method; the token is the credential. Its
other AdminService methods answer UNIMPLEMENTED (the generated base class).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import grpc

from tessera.api._callpath import CallPath
from tessera.calls import Auditor
from tessera.core.errors import ConfigError, FieldViolation, InvalidArgument, TesseraError
from tessera.peering import Enrolled, Peering
from tessera.pki import ReloadableServerCredentials, TlsMaterial
from tessera_client.pb import admin_pb2, admin_pb2_grpc, resources_pb2

log = logging.getLogger(__name__)

#: A CSR is well under this; anything bigger is refused before parsing.
MAX_REQUEST_BYTES = 64 << 10


def enrolled_to_pb(e: Enrolled, node: resources_pb2.Identity) -> admin_pb2.EnrollPeerResponse:
    """Domain enrolment to protobuf."""
    return admin_pb2.EnrollPeerResponse(certificate_chain_pem=e.chain_pem.decode(),
                                        trust_roots_pem=e.roots_pem.decode(), node=node)


async def enroll_pb(
    peering: Peering, request: admin_pb2.EnrollPeerRequest, node: resources_pb2.Identity
) -> admin_pb2.EnrollPeerResponse:
    """Validate an EnrollPeer request, enrol, answer."""
    violations = []
    if not request.token:
        violations.append(FieldViolation("token", "is required"))
    if not request.csr_pem:
        violations.append(FieldViolation("csr_pem", "is required"))
    if request.address:
        host, sep, port = request.address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            violations.append(FieldViolation("address", "must be host:port"))
    if violations:
        raise InvalidArgument(violations)
    enrolled = await peering.enroll(request.token, request.csr_pem.encode(), request.address)
    return enrolled_to_pb(enrolled, node)


class _EnrollOnly(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, peering: Peering, node: resources_pb2.Identity) -> None:
        self.peering = peering
        self.node = node

    async def EnrollPeer(
        self, request: admin_pb2.EnrollPeerRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.EnrollPeerResponse:
        # The call path around this listener maps errors and audits every attempt.
        try:
            return await enroll_pb(self.peering, request, self.node)
        except TesseraError as exc:
            log.info("enrolment refused: %s (%s)", exc.reason, context.peer())
            raise


def _server_only_credentials(creds: ReloadableServerCredentials) -> grpc.ServerCredentials:
    """Server TLS without client authentication that follows certificate rotation."""
    lock = threading.Lock()
    seen = [creds.generation]

    def config(m: TlsMaterial) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(m.key_pem, m.chain_pem)])

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC before each handshake; hand over a new config only on change.
        with lock:
            if creds.generation == seen[0]:
                return None
            seen[0] = creds.generation
        return config(creds.material)

    return grpc.dynamic_ssl_server_credentials(
        config(creds.material), fetch, require_client_authentication=False)


async def start_enroll_listener(
    address: str, peering: Peering, node: resources_pb2.Identity,
    creds: ReloadableServerCredentials, *, auditor: Auditor | None = None,
    options: Sequence[tuple[str, int]] = (),
) -> tuple[grpc.aio.Server, int]:
    """Bind and start the enrolment listener; returns the server and its port.

    `options` are the connection limits (handshake timeout, connection cap): this
    listener takes connections from anyone, so they matter most here.
    """
    server = grpc.aio.server(
        interceptors=[CallPath(node.trust_domain, auditor=auditor, identified=False)],
        options=[("grpc.so_reuseport", 0),
                 ("grpc.max_receive_message_length", MAX_REQUEST_BYTES), *options],
    )
    servicer = _EnrollOnly(peering, node)  # type: ignore[abstract]  # the rest: UNIMPLEMENTED
    admin_pb2_grpc.add_AdminServiceServicer_to_server(servicer, server)
    try:
        port = server.add_secure_port(address, _server_only_credentials(creds))
    except RuntimeError as exc:
        raise ConfigError(
            f"node.enroll_listen_address: cannot bind {address} ({exc}); choose a free port"
        ) from None
    await server.start()
    return server, port

