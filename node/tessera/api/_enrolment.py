"""The enrolment listener: server-authenticated TLS, serving only EnrollPeer.

A joining node has no client certificate yet, so it cannot reach the mTLS listener. This
second listener asks for none and serves one method; the token is the credential. Its
other AdminService methods answer UNIMPLEMENTED (gRPC itself: only EnrollPeer is registered).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

import grpc

from tessera.api._callpath import CallPath
from tessera.audit import AuditEntry, Outcome
from tessera.calls import Auditor, CallOutcome
from tessera.config import EnrolmentConfig
from tessera.core.errors import (
    ConfigError,
    FieldViolation,
    InvalidArgument,
    ResourceExhausted,
    TesseraError,
)
from tessera.core.net import split_host_port
from tessera.peering import Enrolled, FloodGuard, Peering, Rate, source_of
from tessera.pki import ReloadableServerCredentials, TlsMaterial, expired_placeholder
from tessera.store import AuditIntent
from tessera_client.pb import admin_pb2, admin_pb2_grpc, resources_pb2

log = logging.getLogger(__name__)

#: A CSR is well under this; anything bigger is refused before parsing.
MAX_REQUEST_BYTES = 64 << 10
#: A joiner makes one call, then hangs up. Connections that stay (idle, or kept busy with
#: refused calls) are closed, so they cannot hold the connection cap shut for good.
IDLE_CLOSE_MS = 5_000
MAX_AGE_MS = 60_000
#: Time a call in flight gets once its connection has reached MAX_AGE_MS (the joiner's
#: own deadline).
MAX_AGE_GRACE_MS = 30_000


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
        try:
            split_host_port(request.address, min_port=1)
        except ValueError:
            violations.append(FieldViolation("address", "must be host:port"))
    if violations:
        raise InvalidArgument(violations)
    enrolled = await peering.enroll(request.token, request.csr_pem.encode(), request.address)
    return enrolled_to_pb(enrolled, node)


#: Set for the current call when its token does not verify: the source network.
_UNVERIFIED: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tessera_unverified_enrolment", default=None)
SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
#: Most source networks given a row of their own per window; the rest share one row
#: ("other"), so many sources (IPv6 makes /64s cheap) cannot multiply the rows either.
MAX_SOURCES_PER_WINDOW = 1024
OTHER_SOURCES = "other"


class EntryWriter(Auditor, Protocol):
    """An auditor that also takes prepared rows (the AuditWriter)."""

    async def record_entry(self, entry: AuditEntry) -> None:
        """Return once the row is durable."""
        ...


class EnrolmentAuditor:
    """The enrolment listener's auditor: attempts with a verified token row by row, the
    others counted and written as one row per source network per window.

    A flood of made-up tokens would otherwise cost one durable row each (1,400 rows/s was
    measured); aggregated, it costs one row per source per minute. Those rows are written
    when their window ends (and on stop), not before each answer.
    """

    def __init__(self, inner: EntryWriter, *, window_s: int = 60) -> None:
        self.inner = inner
        self.window_s = window_s
        #: (window start, source) -> count of attempts by reason.
        self._counts: dict[tuple[int, str], dict[str, int]] = {}
        #: Sources seen per window, to cap the rows one window can cost.
        self._sources: dict[int, int] = {}
        self._task: asyncio.Task[None] | None = None

    async def record(self, outcome: CallOutcome) -> None:
        """Write a verified attempt's row now; count an unverified one."""
        source = _UNVERIFIED.get()
        if source is None:
            await self.inner.record(outcome)
            return
        window = int(time.time()) // self.window_s * self.window_s
        if (window, source) not in self._counts:
            if self._sources.get(window, 0) >= MAX_SOURCES_PER_WINDOW:
                source = OTHER_SOURCES
            else:
                self._sources[window] = self._sources.get(window, 0) + 1
        reasons = self._counts.setdefault((window, source), {})
        key = outcome.reason or outcome.code.name
        reasons[key] = reasons.get(key, 0) + 1

    def intent(self, outcome: Callable[[], CallOutcome]) -> AuditIntent:
        """A redeemed token's record commits with the enrolment (`effect_transaction`)."""
        return self.inner.intent(outcome)

    def start(self) -> None:
        """Write each window's rows once it has ended."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="tessera-enrolment-audit")

    async def close(self) -> None:
        """Stop and write every count still held, finished window or not."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush(all_windows=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.window_s - time.time() % self.window_s + 0.05)
            await self.flush()

    async def flush(self, *, all_windows: bool = False) -> None:
        """Write the rows of ended windows (of every window with `all_windows`)."""
        now = int(time.time())
        done = [k for k in self._counts if all_windows or k[0] + self.window_s <= now]
        for window in [w for w in self._sources if all_windows or w + self.window_s <= now]:
            del self._sources[window]
        for key in sorted(done):
            reasons = self._counts.pop(key)
            try:
                await self.inner.record_entry(self._entry(key[0], key[1], reasons))
            except TesseraError as exc:
                # Keep the counts: the next flush tries again.
                log.error("aggregated enrolment audit row not written (%s)", exc.reason)
                for reason, n in reasons.items():
                    held = self._counts.setdefault(key, {})
                    held[reason] = held.get(reason, 0) + n
                return

    def _entry(self, window: int, source: str, reasons: dict[str, int]) -> AuditEntry:
        limited = reasons.get("RATE_LIMITED", 0)
        return AuditEntry(
            time=dt.datetime.fromtimestamp(min(window + self.window_s, time.time()), dt.UTC),
            identity="", peer="", grant="", service=SERVICE, method="EnrollPeer", kind="",
            query_hash="",
            outcome=(Outcome.RATE_LIMITED if limited else Outcome.DENIED_BY_POLICY).value,
            status_code="RESOURCE_EXHAUSTED" if limited else "UNAUTHENTICATED",
            bytes_out=0, latency_us=0, trace_id="", reason="UNVERIFIED_ATTEMPTS",
            detail={"source": source, "count": sum(reasons.values()), "reasons": reasons,
                    "window_start": window, "window_s": self.window_s},
        )


#: Refusals that hold for good: a token refused so once (spent, expired, not the secret
#: issued) is then handled like a forged one, limited and counted; replaying it skipped
#: the limit, each attempt a database lookup and a durable audit row.
FINAL_REFUSALS = frozenset({"TOKEN_USED", "TOKEN_EXPIRED", "TOKEN_INVALID"})
#: Most such tokens remembered (their SHA-256), oldest forgotten first.
MAX_REFUSED_TOKENS = 4096


class _EnrollOnly(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, peering: Peering, node: resources_pb2.Identity,
                 guard: FloodGuard) -> None:
        self.peering = peering
        self.node = node
        self.guard = guard
        self.refused: OrderedDict[bytes, None] = OrderedDict()

    async def EnrollPeer(
        self, request: admin_pb2.EnrollPeerRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.EnrollPeerResponse:
        # The call path around this listener maps errors and audits every attempt.
        token_key = hashlib.sha256(request.token.encode()).digest()
        if token_key in self.refused or not self.peering.token_verifies(request.token):
            source = source_of(context.peer())
            _UNVERIFIED.set(source)
            wait = self.guard.take(source, time.monotonic())
            if wait:
                raise ResourceExhausted(
                    "too many enrolment attempts with tokens this node did not issue; "
                    "retry later", retry_after_s=wait, subject=source)
        try:
            return await enroll_pb(self.peering, request, self.node)
        except TesseraError as exc:
            if _UNVERIFIED.get() is None:  # the rest are counted, not logged one by one
                log.info("enrolment refused: %s (%s)", exc.reason, context.peer())
                if exc.reason in FINAL_REFUSALS:
                    self.refused[token_key] = None
                    if len(self.refused) > MAX_REFUSED_TOKENS:
                        self.refused.popitem(last=False)
            raise


def _server_only_credentials(creds: ReloadableServerCredentials) -> grpc.ServerCredentials:
    """Server TLS without client authentication that follows certificate rotation."""
    lock = threading.Lock()
    # The generation handed over last; -1 once the expiry placeholder was.
    seen = [creds.generation]

    def config(m: TlsMaterial) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(m.key_pem, m.chain_pem)])

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC before each handshake; hand over a new config only on change.
        with lock:
            if creds.expired:
                # Like the mTLS listener: never present a certificate past its expiry.
                if seen[0] == -1:
                    return None
                seen[0] = -1
                return expired_placeholder(None)
            if creds.generation == seen[0]:
                return None
            seen[0] = creds.generation
        return config(creds.material)

    return grpc.dynamic_ssl_server_credentials(
        config(creds.material), fetch, require_client_authentication=False)


async def start_enroll_listener(
    address: str, peering: Peering, node: resources_pb2.Identity,
    creds: ReloadableServerCredentials, *, auditor: Auditor | None = None,
    options: Sequence[tuple[str, int]] = (), limits: EnrolmentConfig | None = None,
    processes: int = 1,
) -> tuple[grpc.aio.Server, int]:
    """Bind and start the enrolment listener; returns the server and its port.

    `options` are the connection limits (handshake timeout, connection cap): this
    listener takes connections from anyone, so they matter most here. `limits` bound the
    attempts whose token does not verify; `auditor` should then be an EnrolmentAuditor.
    With `processes` > 1 (the node's serving processes) the port is shared with
    SO_REUSEPORT and each process enforces its share of those limits.
    """
    limits = limits or EnrolmentConfig()
    n = max(1, processes)
    guard = FloodGuard(
        Rate(limits.unverified_per_source_per_s / n,
             max(1, limits.unverified_per_source_burst // n)),
        Rate(limits.unverified_per_s / n, max(1, limits.unverified_burst // n)))
    server = grpc.aio.server(
        interceptors=[CallPath(node.trust_domain, auditor=auditor, identified=False)],
        options=[("grpc.so_reuseport", 1 if n > 1 else 0),
                 ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                 ("grpc.max_connection_idle_ms", IDLE_CLOSE_MS),
                 ("grpc.max_connection_age_ms", MAX_AGE_MS),
                 ("grpc.max_connection_age_grace_ms", MAX_AGE_GRACE_MS), *options],
    )
    servicer = _EnrollOnly(peering, node, guard)  # type: ignore[abstract]
    # EnrollPeer alone: gRPC answers the other methods UNIMPLEMENTED before the call path,
    # so they cost no audit row (from the base class, each was a row, past the limit).
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "EnrollPeer": grpc.unary_unary_rpc_method_handler(
            servicer.EnrollPeer,
            request_deserializer=admin_pb2.EnrollPeerRequest.FromString,
            response_serializer=admin_pb2.EnrollPeerResponse.SerializeToString),
    }),))
    try:
        port = server.add_secure_port(address, _server_only_credentials(creds))
    except RuntimeError as exc:
        raise ConfigError(
            f"node.enroll_listen_address: cannot bind {address} ({exc}); choose a free port"
        ) from None
    await server.start()
    return server, port

