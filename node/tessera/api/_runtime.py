"""What servicers work with: the node's configuration, connections and components, typed.

Built once by the composition root (`tessera.app`), which owns opening and closing each
component; servicers only use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import redis.asyncio as redis

from tessera.api._reload import Reloader
from tessera.audit import AuditWriter
from tessera.commands import Registry, Runner
from tessera.config import Config
from tessera.core.pagination import PageTokens
from tessera.core.paths import CredentialFiles, NodePaths
from tessera.events import EventService
from tessera.federation import Federation, Followers
from tessera.grants import GrantStore
from tessera.peering import PeerCertificateRenewal, Peering
from tessera.pki import NodeCertificates, ReloadableServerCredentials, SpiffeId
from tessera.ratelimit import RateLimiter, RowBudgets
from tessera.store import OperationStore, Pool, ResourceStore, StoreHealth


@dataclass
class Endpoints:
    """Where the node listens, known only once its servers are bound."""

    #: The bound gRPC address (host:port).
    listen_address: str = ""
    #: The dialable address of the enrolment listener.
    enroll_address: str = ""


@dataclass(frozen=True)
class Runtime:
    """The live state servicers work with."""

    cfg: Config
    paths: NodePaths
    identity: SpiffeId
    pool: Pool
    store: ResourceStore
    tokens: PageTokens
    valkey: redis.Redis
    credentials: ReloadableServerCredentials
    kinds: frozenset[str]
    started_at: datetime
    schema_version: int
    issuer_kind: str
    #: The PostgreSQL DSN and Valkey URL in use (embedded or configured), for doctor.
    dsn: str
    valkey_url: str
    #: The files the server certificate is read from.
    server_files: CredentialFiles
    certificates: NodeCertificates
    federation: Federation
    grants: GrantStore
    peering: Peering
    #: Renews the client certificates this node holds for calling its peers.
    peer_renewal: PeerCertificateRenewal
    limiter: RateLimiter
    #: None only when audit is turned off (benchmarks).
    auditor: AuditWriter | None
    endpoints: Endpoints
    #: Operations (the Execute write path), command types and the runner of long ones.
    operations: OperationStore
    commands: Registry
    runner: Runner
    #: Publishing, streams and durable subscriptions of the event log.
    events: EventService
    #: Grants' row budgets (None only in tests that build a Runtime without Valkey).
    budgets: RowBudgets | None = None
    #: Whether PostgreSQL answers (probed); store-backed calls fail fast while it does not.
    #: None only in tests that build a Runtime without a node.
    store_health: StoreHealth | None = None
    #: Applies `AdminService.Reload` and SIGHUP (None only in tests without a node).
    reloader: Reloader | None = None
    #: Following joined peers' events (None only in tests that build a Runtime by hand).
    followers: Followers | None = None

    @property
    def listen_address(self) -> str:
        """The bound gRPC address."""
        return self.endpoints.listen_address
