"""Configuration: frozen dataclasses per concern, loaded from TOML and `TESSERA_*` variables.

Precedence, lowest first: defaults, the TOML file, environment variables, command-line
flags. Every environment variable is `TESSERA_<SECTION>_<FIELD>`, e.g.
`TESSERA_STORE_DSN` or `TESSERA_NODE_LISTEN_ADDRESS`. A wrong value raises
`ConfigError` whose message is one line naming the setting and the fix.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tessera.config._limits import parse_limits
from tessera.core.errors import ConfigError
from tessera.core.net import split_host_port

DEFAULT_DATA_DIR = Path.home() / ".local" / "share" / "tessera"
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?$")
_DOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
METRICS = ("cosine", "l2", "inner_product")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: Event loops a serving process can run (`node.event_loop`).
EVENT_LOOPS = ("uvloop", "asyncio")
#: Sections applied by a reload (`AdminService.Reload`, SIGHUP) without a restart.
RELOADABLE_SECTIONS = ("ratelimit", "log")


@dataclass(frozen=True)
class NodeConfig:
    """Who the node is and where it listens."""

    #: Node name, the last part of its SPIFFE identity. Lower-case letters, digits, '-'.
    #: Empty: derived at first start from the host name plus a random suffix and kept in
    #: data_dir/node-name, so two default nodes never share a name. Replicas of one node
    #: with separate data directories must set it (each would derive its own).
    name: str = ""
    #: SPIFFE trust domain of identities issued for this node.
    trust_domain: str = "tessera.local"
    #: Directory for embedded services, certificates and secrets.
    data_dir: Path = DEFAULT_DATA_DIR
    #: host:port the gRPC server binds; port 0 picks a free port.
    listen_address: str = "127.0.0.1:50051"
    #: host:port peers should call; defaults to the listen address.
    advertised_address: str = ""
    #: host:port of the enrolment listener (server-only TLS, EnrollPeer only); empty means
    #: the listen address's host on a free port.
    enroll_listen_address: str = ""
    #: Seconds in-flight calls get to finish on SIGTERM.
    shutdown_grace_s: float = 10.0
    #: Serving processes (`tessera serve --workers`): a positive number, or "auto" for the
    #: host's cores. More than one share the listen ports with SO_REUSEPORT.
    workers: str = "1"
    #: The serving processes' asyncio event loop: "uvloop" (libuv; about 10 % more calls
    #: per second on the benchmark) or "asyncio" (the standard library's).
    event_loop: str = "uvloop"

    @property
    def worker_count(self) -> int:
        """`workers` resolved: "auto" is the number of cores this process may use."""
        if self.workers.strip().lower() == "auto":
            return max(1, len(os.sched_getaffinity(0)))
        return int(self.workers)


@dataclass(frozen=True)
class StoreConfig:
    """PostgreSQL with pgvector."""

    #: libpq DSN/URI of an external PostgreSQL; empty runs the embedded one.
    dsn: str = ""
    #: Smallest number of pooled connections.
    pool_min: int = 2
    #: Largest number of pooled connections.
    pool_max: int = 10
    #: Dimension N of the `vector(N)` embedding column; fixed once the schema exists.
    embedding_dimension: int = 384
    #: Distance metric of the HNSW index: cosine, l2 or inner_product.
    metric: str = "cosine"
    #: Embedding model name reported by Describe (informational).
    embedding_model: str = ""
    #: Seconds a statement may run before it is cancelled.
    statement_timeout_s: float = 10.0
    #: Seconds a call waits for a pooled connection before it answers UNAVAILABLE; also the
    #: bound on the health probe. While PostgreSQL is known to be down calls fail at once.
    unavailable_after_s: float = 2.0
    #: Seconds between PostgreSQL health probes (faster while it is down, to notice recovery).
    health_interval_s: float = 2.0
    #: Comma-separated resource kinds this node stores; others are refused.
    kinds: str = "task,note,memory,document,credential"
    #: Comma-separated kinds no grant can share, whatever it names (refused at creation
    #: and withheld at read time).
    never_shared_kinds: str = "credential"

    @property
    def kind_set(self) -> frozenset[str]:
        """The kinds as a set."""
        return frozenset(k.strip() for k in self.kinds.split(",") if k.strip())

    @property
    def never_shared_set(self) -> frozenset[str]:
        """The never-shareable kinds as a set."""
        return frozenset(k.strip() for k in self.never_shared_kinds.split(",") if k.strip())


@dataclass(frozen=True)
class ValkeyConfig:
    """Valkey for rate limiting and caching."""

    #: redis:// or unix:// URL of an external Valkey; empty runs the embedded one.
    url: str = ""
    #: Milliseconds a Valkey call may take before the node stops waiting for it.
    timeout_ms: int = 200


@dataclass(frozen=True)
class TlsConfig:
    """Certificates the server presents and the roots it trusts.

    All three empty means the embedded development CA under the data directory.
    """

    #: PEM chain (leaf first) the server presents.
    cert_file: str = ""
    #: PEM private key of that chain.
    key_file: str = ""
    #: PEM roots that client certificates must chain to.
    ca_file: str = ""
    #: Lifetime of certificates the development CA issues, in hours.
    dev_cert_ttl_h: float = 24.0 * 30


@dataclass(frozen=True)
class CaConfig:
    """step-ca: where the node enrols and renews its certificates, and what it trusts.

    `url` empty means no step-ca: the `[tls]` files or the development CA are used.
    """

    #: https://host:port of step-ca; set it to enrol from step-ca into data_dir/pki.
    url: str = ""
    #: PEM file of the CA's root, trusted as is (explicit trust, never the system store).
    root_file: str = ""
    #: SHA-256 fingerprint (hex) of the CA's root; the root is fetched and pinned to it.
    root_fingerprint: str = ""
    #: Name of the JWK provisioner that one-time tokens name as issuer.
    provisioner_name: str = "tessera"
    #: File with the provisioner's private key: a JWK (JSON) or a PKCS#8 PEM.
    provisioner_key_file: str = ""
    #: File holding the password of an encrypted provisioner key.
    provisioner_password_file: str = ""
    #: File holding a single-use enrolment token (used when there is no provisioner key).
    bootstrap_token_file: str = ""
    #: Fraction of a certificate's lifetime after which it is renewed (0.5 to 0.9).
    renew_fraction: float = 2.0 / 3.0
    #: PEM or DER CRL file whose serials the node refuses.
    crl_file: str = ""
    #: http(s) URL of a CRL whose serials the node refuses.
    crl_url: str = ""
    #: Seconds between CRL reloads; 0 loads it only at start.
    crl_refresh_s: float = 300.0
    #: Seconds a call to the CA may take.
    timeout_s: float = 10.0


@dataclass(frozen=True)
class RateLimitConfig:
    """Rate limiting of admitted calls (GCRA in Valkey, per grant and method class).

    Limits are `<class>=<rate_per_s>/<burst>` items, comma-separated, over the classes
    read, search, command, event and admin; a rate of 0 means unlimited. Classes not
    named keep the built-in defaults (`tessera.ratelimit.DEFAULT_LOCAL` / `DEFAULT_PEER`).
    """

    #: Whether calls are limited at all.
    enabled: bool = True
    #: Limits of local identities (tools, admins), e.g. "read=1000/2000, admin=0".
    local_limits: str = ""
    #: Limits of peers whose grant carries no rate of its own.
    peer_limits: str = ""
    #: When Valkey does not answer: "local" (per-replica limiter) or "closed" (refuse).
    on_valkey_failure: str = "local"
    #: Milliseconds one decision may wait for Valkey before the fallback takes over.
    decision_timeout_ms: int = 50
    #: Longest pause, in seconds, between probes of a Valkey that stopped answering.
    probe_max_interval_s: float = 5.0
    #: Seconds of rejections the admin view counts as recent.
    recent_window_s: int = 900


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics endpoint."""

    #: host:port for the HTTP metrics endpoint; empty disables it.
    listen_address: str = ""


@dataclass(frozen=True)
class TracingConfig:
    """OpenTelemetry tracing, exported over OTLP/gRPC; off while `endpoint` is empty."""

    #: host:port of an OTLP/gRPC receiver (an OpenTelemetry Collector, Tempo, Jaeger).
    endpoint: str = ""
    #: true sends spans without TLS (a collector on localhost or a sidecar).
    insecure: bool = False
    #: PEM roots the collector's certificate must chain to; empty uses the system roots.
    ca_file: str = ""
    #: Fraction (0 to 1) of traces sampled where they start, decided by trace id.
    sample_ratio: float = 1.0
    #: false ignores a caller's sampled flag (the ratio decides); true follows it.
    trust_remote_parent: bool = False
    #: service.name of the exported spans.
    service_name: str = "tessera"
    #: Milliseconds spans wait in the batch before they are sent.
    export_delay_ms: int = 1000
    #: Seconds one export may take.
    export_timeout_s: float = 10.0


@dataclass(frozen=True)
class LogConfig:
    """The node's log lines (stderr)."""

    #: "text" (for a terminal) or "json" (one object per line, for a log pipeline).
    format: str = "text"
    #: One INFO line per finished call (logger `tessera.access`); false drops them.
    access: bool = True
    #: DEBUG, INFO, WARNING or ERROR; empty uses `tessera --log-level` (default INFO).
    #: Changeable with `tessera reload` (or SIGHUP), like the rest of this section.
    level: str = ""


@dataclass(frozen=True)
class FederationConfig:
    """Calling peers when a query fans out (`sources` ALL or PEERS)."""

    #: Milliseconds each peer gets to answer before it counts as offline.
    peer_timeout_ms: int = 2000
    #: Seconds a peer's list/get answer stays in the offline cache.
    cache_ttl_s: int = 30
    #: Consecutive transport failures that open a peer's circuit breaker.
    breaker_failures: int = 3
    #: Seconds an open breaker fails fast before letting one probe through.
    breaker_cooldown_s: float = 10.0


@dataclass(frozen=True)
class GrpcConfig:
    """Connection limits of the gRPC listeners, against idle and abusive connections.

    The defaults hold 4,096 connections and 2,048 streams on each, so 1,000+ long-lived
    event streams fit either as many clients or as many streams on one channel.
    """

    #: Milliseconds a new connection gets to finish its TLS handshake before it is closed
    #: (gRPC's own default is 120 s, which let idle sockets pile up).
    handshake_timeout_ms: int = 10_000
    #: Most connections the service listener holds; more are closed at once.
    max_connections: int = 4096
    #: Most connections the enrolment listener (no client certificate) holds.
    enroll_max_connections: int = 256
    #: Most concurrent streams (calls) on one connection; more wait on the client.
    max_concurrent_streams: int = 2048
    #: Shortest interval, in milliseconds, a client may ping without sending data; faster
    #: pings count as strikes (clients of this package ping every 60 s).
    min_ping_interval_ms: int = 30_000
    #: Pings faster than the minimum tolerated before the connection is closed.
    max_ping_strikes: int = 2
    #: Milliseconds of silence after which the server pings a client, and the time the
    #: client gets to answer before its connection is closed (frees dead connections).
    keepalive_time_ms: int = 120_000
    keepalive_timeout_ms: int = 20_000

    def server_options(self, *, enrolment: bool = False) -> list[tuple[str, int]]:
        """These limits as grpcio channel arguments (names as in grpc_types.h)."""
        return [
            ("grpc.server_handshake_timeout_ms", self.handshake_timeout_ms),
            ("grpc.max_allowed_incoming_connections",
             self.enroll_max_connections if enrolment else self.max_connections),
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            ("grpc.http2.min_ping_interval_without_data_ms", self.min_ping_interval_ms),
            ("grpc.http2.max_ping_strikes", self.max_ping_strikes),
            # Clients keep idle channels alive with pings; allowed at the rate above.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.keepalive_time_ms", self.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", self.keepalive_timeout_ms),
        ]


@dataclass(frozen=True)
class EnrolmentConfig:
    """Limits on enrolment attempts whose token does not verify (anyone can send them).

    Attempts with a token this node issued are never limited here and are audited one by
    one; the others are refused beyond these rates with RESOURCE_EXHAUSTED and audited as
    one row per source network (/32 IPv4, /64 IPv6) per window, with a count.
    """

    #: Unverified attempts per second one source network may make, and its burst.
    unverified_per_source_per_s: float = 1.0
    unverified_per_source_burst: int = 10
    #: Unverified attempts per second from all sources together, and their burst.
    unverified_per_s: float = 10.0
    unverified_burst: int = 50
    #: Seconds each aggregated audit row covers (one row per source per window).
    audit_window_s: int = 60


@dataclass(frozen=True)
class AuditConfig:
    """The audit log (always on in production)."""

    #: For benchmarking only: false answers calls without writing their audit rows.
    enabled: bool = True
    #: Milliseconds a batch waits for more rows while calls finish concurrently (never for
    #: a lone call): fewer commits, less CPU per call, for a little latency. 0 commits as
    #: soon as the previous batch has.
    batch_delay_ms: float = 2.0


@dataclass(frozen=True)
class OperationsConfig:
    """Long-running operations: leases, recovery, retention."""

    #: Seconds a runner's lease on a running operation lasts; renewed every third of it.
    #: After a node dies, its operations are recovered once their lease expired.
    lease_ttl_s: float = 30.0
    #: Seconds between sweeps for expired leases and orphaned pending operations.
    sweep_interval_s: float = 2.0
    #: Seconds a pending operation is left to the node that accepted it before another
    #: node's sweep may start it.
    claim_grace_s: float = 5.0
    #: Starts of a retry-safe handler before its operation ends FAILED (NODE_RESTARTED).
    max_attempts: int = 3
    #: Operations one node process runs at once; more wait PENDING.
    max_running: int = 16
    #: Seconds a cancelled handler gets (after its cancel hook) before it is interrupted.
    cancel_grace_s: float = 5.0
    #: Hours a finished operation is kept (and its idempotency key remembered).
    retention_h: float = 24.0 * 7


@dataclass(frozen=True)
class AgentsConfig:
    """Agent runs (`agent.spawn`): the allow-list and how agents are confined.

    Each `[agents.<name>]` table is one allowed agent; `tessera.commands` checks the
    entries when the node starts (a wrong one stops the start, named in one line).
    """

    #: Each run gets its own uid (and the same gid) from this inclusive range "LOW-HIGH":
    #: one with no passwd or group entry, no live process and no other live run, so one
    #: run cannot signal, trace or read another. Empty: every run is `user` (not isolated).
    uid_range: str = "1900000000-1900065535"
    #: Unprivileged account every agent runs as when `uid_range` is empty.
    user: str = ""
    #: Seconds between SIGTERM and SIGKILL when a run is cancelled or killed.
    kill_grace_s: float = 5.0
    #: The `[agents.<name>]` tables, as written (from the environment or the supervisor:
    #: TESSERA_AGENTS_ALLOW as one JSON object).
    allow: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class EventsConfig:
    """The event log and its streams."""

    #: Events older than this many seconds are pruned; 0 keeps them regardless of age.
    retention_max_age_s: float = 7 * 24 * 3600.0
    #: At most this many of the newest events are kept; 0 means no count limit.
    retention_max_count: int = 0
    #: Seconds between pruning runs on each replica.
    prune_interval_s: float = 60.0
    #: Largest serialised JSON payload of a published event, in bytes.
    max_payload_bytes: int = 64 * 1024
    #: Most events one PublishBatch may carry.
    max_batch: int = 1000
    #: Most durable subscriptions one caller may have.
    max_subscriptions_per_caller: int = 100
    #: Most Subscribe streams one caller may hold open on one process: each holds up to
    #: `stream_buffer` events (a page) while its consumer is slow, so they are capped.
    max_streams_per_caller: int = 16
    #: Events a stream reads from the database at a time: its whole buffer, whatever the
    #: consumer's speed (a slow consumer holds the stream back by gRPC flow control).
    stream_buffer: int = 256
    #: Seconds of idleness after which a stream sends a heartbeat.
    keepalive_s: float = 15.0
    #: Longest wait between a follower's reconnection attempts to a followed peer (the
    #: wait doubles from 0.5 s up to this, with jitter).
    follow_backoff_max_s: float = 10.0
    #: Seconds between checks of which peers to follow (follow changes made through this
    #: process apply at once; through another replica, within this).
    follow_poll_s: float = 2.0


@dataclass(frozen=True)
class Config:
    """The whole configuration of a node."""

    node: NodeConfig = field(default_factory=NodeConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    valkey: ValkeyConfig = field(default_factory=ValkeyConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    ca: CaConfig = field(default_factory=CaConfig)
    ratelimit: RateLimitConfig = field(default_factory=RateLimitConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    enrolment: EnrolmentConfig = field(default_factory=EnrolmentConfig)
    operations: OperationsConfig = field(default_factory=OperationsConfig)
    agents: AgentsConfig = field(default_factory=AgentsConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def tier(self) -> str:
        """'embedded' when any dependency runs embedded, else 'federated'."""
        if self.store.dsn and self.valkey.url and (self.tls.cert_file or self.ca.url):
            return "federated"
        return "embedded"


_SECTIONS: dict[str, type[Any]] = {
    "node": NodeConfig,
    "store": StoreConfig,
    "valkey": ValkeyConfig,
    "tls": TlsConfig,
    "metrics": MetricsConfig,
    "ca": CaConfig,
    "ratelimit": RateLimitConfig,
    "audit": AuditConfig,
    "federation": FederationConfig,
    "grpc": GrpcConfig,
    "enrolment": EnrolmentConfig,
    "operations": OperationsConfig,
    "agents": AgentsConfig,
    "events": EventsConfig,
    "tracing": TracingConfig,
    "log": LogConfig,
}


def _coerce(setting: str, kind: Any, raw: Any) -> Any:
    """Convert a TOML or environment value to the field's type."""
    try:
        if kind in (int, "int"):
            if isinstance(raw, bool):
                raise ValueError
            return int(raw)
        if kind in (float, "float"):
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if kind in (Path, "Path"):
            # Resolved once, here: every process and every path built from it (sockets,
            # node.json, the DSN) then means the same place whatever the working directory.
            return Path(str(raw)).expanduser().resolve()
        if kind in (bool, "bool"):
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind in (str, "str"):
            if setting.startswith("node.workers") and isinstance(raw, int) \
                    and not isinstance(raw, bool):
                return str(raw)  # `workers = 4` in TOML, beside `workers = "auto"`
            if not isinstance(raw, str):
                raise ValueError
            return raw
    except ValueError:
        name = getattr(kind, "__name__", kind)
        raise ConfigError(f"{setting}: expected {name}, got {raw!r}; fix the value") from None
    raise ConfigError(f"{setting}: unsupported type")


def load(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Load and validate the configuration.

    `overrides` maps "section.field" to values from command-line flags.
    """
    env = os.environ if environ is None else environ
    values: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    if path is None and env.get("TESSERA_CONFIG"):
        path = Path(env["TESSERA_CONFIG"])
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; fix --config") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for section, table in data.items():
            if section not in _SECTIONS or not isinstance(table, dict):
                raise ConfigError(
                    f"{path}: unknown section [{section}]; expected one of {sorted(_SECTIONS)}"
                )
            if section == "agents":
                # Sub-tables are allow-list entries, checked by the commands layer.
                allow = {k: v for k, v in table.items() if isinstance(v, dict)}
                table = {k: v for k, v in table.items() if not isinstance(v, dict)}
                values[section]["allow"] = allow
            values[section].update(table)
    for key, raw in env.items():
        if not key.startswith("TESSERA_") or key == "TESSERA_CONFIG":
            continue
        rest = key[len("TESSERA_") :].lower()
        section, _, name = rest.partition("_")
        if section in _SECTIONS and name:
            values[section][name] = raw
    for dotted, raw in (overrides or {}).items():
        if raw is None:
            continue
        section, _, name = dotted.partition(".")
        values[section][name] = raw

    built: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, raw in values[section].items():
            setting = f"{section}.{name} (TESSERA_{section.upper()}_{name.upper()})"
            if section == "agents" and name == "allow":
                table_or_text: Any = raw
                if isinstance(raw, str):
                    # From the supervisor, which hands its configuration down as text.
                    try:
                        table_or_text = json.loads(raw)
                    except ValueError:
                        table_or_text = None
                if not isinstance(table_or_text, dict):
                    raise ConfigError("agents.allow: write one [agents.<name>] table per agent")
                kwargs[name] = table_or_text
                continue
            if name not in known:
                raise ConfigError(f"{setting}: unknown setting; expected one of {sorted(known)}")
            kwargs[name] = _coerce(setting, known[name].type, raw)
        built[section] = cls(**kwargs)
    cfg = Config(**built)
    validate(cfg)
    return cfg


def _check_hostport(setting: str, value: str) -> None:
    try:
        split_host_port(value)
    except ValueError:
        raise ConfigError(
            f"{setting}: {value!r} is not host:port; use e.g. 127.0.0.1:50051") from None


def validate(cfg: Config) -> None:
    """Raise ConfigError naming the first wrong setting."""
    n, s = cfg.node, cfg.store
    if n.name and not _NAME_RE.match(n.name):
        raise ConfigError(
            f"node.name: {n.name!r} must be 1-64 of [a-z0-9-], not starting or ending with '-'"
        )
    if not _DOMAIN_RE.match(n.trust_domain):
        raise ConfigError(f"node.trust_domain: {n.trust_domain!r} must be a DNS-like name")
    _check_hostport("node.listen_address", n.listen_address)
    if n.advertised_address:
        _check_hostport("node.advertised_address", n.advertised_address)
    if n.enroll_listen_address:
        _check_hostport("node.enroll_listen_address", n.enroll_listen_address)
    w = n.workers.strip().lower()
    if w != "auto" and not (w.isdigit() and 1 <= int(w) <= 256):
        raise ConfigError(f"node.workers: {n.workers!r} must be a number from 1 to 256 or "
                          "'auto' (one per core)")
    if n.event_loop not in EVENT_LOOPS:
        raise ConfigError(f"node.event_loop: {n.event_loop!r} must be one of "
                          f"{', '.join(EVENT_LOOPS)}")
    if not 1 <= s.embedding_dimension <= 16000:
        raise ConfigError("store.embedding_dimension: must be between 1 and 16000")
    if s.metric not in METRICS:
        raise ConfigError(f"store.metric: {s.metric!r} must be one of {', '.join(METRICS)}")
    if not 1 <= s.pool_min <= s.pool_max:
        raise ConfigError("store.pool_min/pool_max: need 1 <= pool_min <= pool_max")
    if not 0.05 <= s.unavailable_after_s <= 60:
        raise ConfigError("store.unavailable_after_s: must be between 0.05 and 60 seconds")
    if not 0.1 <= s.health_interval_s <= 60:
        raise ConfigError("store.health_interval_s: must be between 0.1 and 60 seconds")
    if s.dsn and not (s.dsn.startswith(("postgresql://", "postgres://")) or "=" in s.dsn):
        raise ConfigError("store.dsn: must be a postgresql:// URI or a libpq key=value DSN")
    bad = [k for k in s.kind_set if not re.match(r"^[a-z0-9._-]{1,64}$", k)]
    if not s.kind_set or bad:
        raise ConfigError(
            f"store.kinds: need a comma-separated list of [a-z0-9._-] names, got {s.kinds!r}"
        )
    v = cfg.valkey
    if v.url and not v.url.startswith(("redis://", "rediss://", "unix://", "valkey://")):
        raise ConfigError("valkey.url: must start with redis://, rediss://, valkey:// or unix://")
    if v.timeout_ms <= 0:
        raise ConfigError("valkey.timeout_ms: must be positive")
    t = cfg.tls
    given = [bool(t.cert_file), bool(t.key_file), bool(t.ca_file)]
    if any(given) and not all(given):
        raise ConfigError(
            "tls: set all of cert_file, key_file and ca_file, or none for the development CA"
        )
    for setting, value in (("tls.cert_file", t.cert_file), ("tls.key_file", t.key_file),
                           ("tls.ca_file", t.ca_file)):
        if value and not Path(value).is_file():
            raise ConfigError(f"{setting}: {value} does not exist or is not a file")
    if cfg.metrics.listen_address:
        _check_hostport("metrics.listen_address", cfg.metrics.listen_address)
    _validate_ca(cfg)
    f = cfg.federation
    if f.peer_timeout_ms <= 0 or f.cache_ttl_s <= 0 or f.breaker_failures <= 0 \
            or f.breaker_cooldown_s <= 0:
        raise ConfigError("federation: peer_timeout_ms, cache_ttl_s, breaker_failures and "
                          "breaker_cooldown_s must all be positive")
    _validate_ratelimit(cfg)
    _validate_observability(cfg)
    if not 0 <= cfg.audit.batch_delay_ms <= 100:
        raise ConfigError("audit.batch_delay_ms: must be between 0 and 100")
    for section, values in (("grpc", cfg.grpc), ("enrolment", cfg.enrolment)):
        for setting, value in dataclasses.asdict(values).items():
            if not value > 0:  # NaN passed `value <= 0`, and a NaN rate is no limit at all
                raise ConfigError(f"{section}.{setting}: must be positive")
    o = cfg.operations
    if o.lease_ttl_s < 1 or o.sweep_interval_s <= 0 or o.claim_grace_s < 0 \
            or o.cancel_grace_s < 0 or o.retention_h <= 0:
        raise ConfigError("operations: lease_ttl_s must be at least 1 and sweep_interval_s, "
                          "retention_h positive (claim_grace_s, cancel_grace_s >= 0); fix them")
    if o.max_attempts < 1 or o.max_running < 1:
        raise ConfigError("operations: max_attempts and max_running must be at least 1")
    if cfg.agents.kill_grace_s < 0:
        raise ConfigError("agents.kill_grace_s: must be at least 0")
    _validate_events(cfg)


def _validate_events(cfg: Config) -> None:
    """The [events] section."""
    e = cfg.events
    if e.retention_max_age_s < 0 or e.retention_max_count < 0:
        raise ConfigError("events.retention_max_age_s/retention_max_count: must be 0 (no "
                          "limit) or positive")
    if e.prune_interval_s <= 0:
        raise ConfigError("events.prune_interval_s: must be positive")
    if not 1024 <= e.max_payload_bytes <= 1 << 20:
        raise ConfigError("events.max_payload_bytes: must be between 1024 and 1048576")
    if not 1 <= e.max_batch <= 10_000:
        raise ConfigError("events.max_batch: must be between 1 and 10000")
    if e.max_subscriptions_per_caller < 1:
        raise ConfigError("events.max_subscriptions_per_caller: must be at least 1")
    if e.max_streams_per_caller < 1:
        raise ConfigError("events.max_streams_per_caller: must be at least 1")
    if not 1 <= e.stream_buffer <= 10_000:
        raise ConfigError("events.stream_buffer: must be between 1 and 10000")
    if not 0.05 <= e.keepalive_s <= 3600:
        raise ConfigError("events.keepalive_s: must be between 0.05 and 3600")
    if not 0.5 <= e.follow_backoff_max_s <= 3600:
        raise ConfigError("events.follow_backoff_max_s: must be between 0.5 and 3600")
    if not 0.05 <= e.follow_poll_s <= 3600:
        raise ConfigError("events.follow_poll_s: must be between 0.05 and 3600")


def _validate_observability(cfg: Config) -> None:
    """The [tracing] and [log] sections."""
    t = cfg.tracing
    if t.endpoint:
        _check_hostport("tracing.endpoint", t.endpoint)
    if t.ca_file and not Path(t.ca_file).is_file():
        raise ConfigError(f"tracing.ca_file: {t.ca_file} does not exist or is not a file")
    if not 0.0 <= t.sample_ratio <= 1.0:
        raise ConfigError(f"tracing.sample_ratio: {t.sample_ratio} must be between 0 and 1")
    if not 1 <= t.export_delay_ms <= 60_000:
        raise ConfigError("tracing.export_delay_ms: must be between 1 and 60000")
    if t.export_timeout_s <= 0:
        raise ConfigError("tracing.export_timeout_s: must be positive")
    if not t.service_name.strip():
        raise ConfigError("tracing.service_name: must not be empty")
    if cfg.log.format not in ("text", "json"):
        raise ConfigError(f"log.format: {cfg.log.format!r} must be 'text' or 'json'")
    if cfg.log.level and cfg.log.level.upper() not in LOG_LEVELS:
        raise ConfigError(f"log.level: {cfg.log.level!r} must be one of {', '.join(LOG_LEVELS)}")


def _validate_ratelimit(cfg: Config) -> None:
    """The [ratelimit] section."""
    r = cfg.ratelimit
    for setting, text in (("ratelimit.local_limits", r.local_limits),
                          ("ratelimit.peer_limits", r.peer_limits)):
        try:
            parse_limits(setting, text)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if r.on_valkey_failure not in ("local", "closed"):
        raise ConfigError(f"ratelimit.on_valkey_failure: {r.on_valkey_failure!r} must be "
                          "'local' or 'closed'")
    if not 1 <= r.decision_timeout_ms <= 10_000:
        raise ConfigError("ratelimit.decision_timeout_ms: must be between 1 and 10000")
    if r.probe_max_interval_s <= 0:
        raise ConfigError("ratelimit.probe_max_interval_s: must be positive")
    if r.recent_window_s < 60:
        raise ConfigError("ratelimit.recent_window_s: must be at least 60")


def _validate_ca(cfg: Config) -> None:
    """The [ca] section: one-line errors naming the setting."""
    c = cfg.ca
    for setting, value in (("ca.provisioner_key_file", c.provisioner_key_file),
                           ("ca.provisioner_password_file", c.provisioner_password_file),
                           ("ca.bootstrap_token_file", c.bootstrap_token_file),
                           ("ca.root_file", c.root_file)):
        if value and not Path(value).is_file():
            raise ConfigError(f"{setting}: {value} does not exist or is not a file")
    if not 0.5 <= c.renew_fraction <= 0.9:
        raise ConfigError(f"ca.renew_fraction: {c.renew_fraction} must be between 0.5 and 0.9")
    if c.crl_refresh_s < 0:
        raise ConfigError("ca.crl_refresh_s: must be 0 (load once) or a positive number of seconds")
    if c.timeout_s <= 0:
        raise ConfigError("ca.timeout_s: must be positive")
    if c.crl_url and not c.crl_url.startswith(("http://", "https://")):
        raise ConfigError(f"ca.crl_url: {c.crl_url!r} must be an http:// or https:// URL")
    if not c.url:
        return
    if not re.match(r"^https://[^/\s]+/?$", c.url):
        raise ConfigError(f"ca.url: {c.url!r} must be https://host:port of step-ca")
    if cfg.tls.cert_file:
        raise ConfigError("ca.url: set either ca.url (step-ca) or tls.cert_file (fixed files), "
                          "not both")
    if not c.root_file and not c.root_fingerprint:
        raise ConfigError("ca.root_fingerprint: set it (or ca.root_file) so the CA's root is "
                          "pinned; the system trust store is never used")
    if c.root_fingerprint and not re.fullmatch(r"[0-9a-fA-F:]{64,95}", c.root_fingerprint):
        raise ConfigError("ca.root_fingerprint: must be the 64 hex digits of the root's SHA-256")
    if c.provisioner_password_file and not c.provisioner_key_file:
        raise ConfigError("ca.provisioner_password_file: set ca.provisioner_key_file as well")
    if not c.provisioner_name.strip():
        raise ConfigError("ca.provisioner_name: must not be empty")


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ConfigSource:
    """Where a node's configuration came from, so a reload can read it again: the file
    (`--config` or TESSERA_CONFIG), the TESSERA_* environment and the command-line
    overrides as they were at start."""

    path: str | None = None
    #: Not in repr(): it may hold a DSN with its password.
    environ: Mapping[str, str] = field(default_factory=dict, repr=False)
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def load(self) -> Config:
        """The configuration as these sources give it now (raises ConfigError)."""
        return load(Path(self.path) if self.path else None, environ=dict(self.environ),
                    overrides=dict(self.overrides))

    def to_json(self) -> dict[str, Any]:
        """For the supervisor's spec to a serving process."""
        return {"path": self.path, "environ": dict(self.environ),
                "overrides": {k: str(v) for k, v in self.overrides.items() if v is not None}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ConfigSource:
        """The inverse of `to_json`."""
        return cls(data.get("path"), dict(data.get("environ") or {}),
                   dict(data.get("overrides") or {}))


def flatten(cfg: Config) -> dict[str, str]:
    """The configuration as `section.field` values, which `load(overrides=...)` parses back."""
    out: dict[str, str] = {}
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            v = getattr(values, f.name)
            if isinstance(v, Mapping):
                # Nested tables (the agent allow-list) travel as JSON.
                out[f"{section.name}.{f.name}"] = json.dumps(v, sort_keys=True)
                continue
            out[f"{section.name}.{f.name}"] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


def changed_settings(old: Config, new: Config) -> list[str]:
    """The `section.field` names whose values differ, in order."""
    a, b = flatten(old), flatten(new)
    return [k for k in b if a.get(k) != b[k]]


def with_reloadable(base: Config, new: Config) -> Config:
    """`base` with the reloadable sections taken from `new`."""
    return dataclasses.replace(base, **{s: getattr(new, s) for s in RELOADABLE_SECTIONS})
