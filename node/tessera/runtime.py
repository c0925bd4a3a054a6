"""What a running node holds: configuration, connections, credentials, paths."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tessera.config import Config
from tessera.errors import Unavailable
from tessera.pagination import PageTokens
from tessera.pki import CredentialFiles, ReloadableServerCredentials, SpiffeId
from tessera.pki._node import NodeCertificates
from tessera.store import Pool, ResourceStore
from tessera_client import Credentials

if TYPE_CHECKING:  # federation imports peering, which imports this module
    from tessera.federation import Federation


@dataclass(frozen=True)
class NodePaths:
    """Files under the data directory."""

    data_dir: Path

    @property
    def pki(self) -> Path:
        """Certificates and keys."""
        return self.data_dir / "pki"

    @property
    def dev_ca(self) -> Path:
        """The development CA's root."""
        return self.pki / "dev-ca"

    @property
    def server(self) -> CredentialFiles:
        """The node's own certificate (server and outbound client)."""
        return CredentialFiles(self.pki / "node.crt", self.pki / "node.key", self.pki / "ca.crt")

    @property
    def admin(self) -> CredentialFiles:
        """A local admin client certificate, for grpcurl and the CLI."""
        return CredentialFiles(self.pki / "admin.crt", self.pki / "admin.key", self.pki / "ca.crt")

    @property
    def client(self) -> CredentialFiles:
        """A local (non-admin) client certificate, for tools."""
        return CredentialFiles(self.pki / "client.crt", self.pki / "client.key",
                               self.pki / "ca.crt")

    @property
    def pgdata(self) -> Path:
        """Embedded PostgreSQL data."""
        return self.data_dir / "postgres"

    @property
    def valkey(self) -> Path:
        """Embedded Valkey data."""
        return self.data_dir / "valkey"

    @property
    def secrets(self) -> Path:
        """Node secrets (page-token key)."""
        return self.data_dir / "secrets"

    @property
    def state_file(self) -> Path:
        """Written once the node is ready: its address and the files to call it with."""
        return self.data_dir / "node.json"


@dataclass
class Runtime:
    """The live state servicers work with."""

    cfg: Config
    paths: NodePaths
    identity: SpiffeId
    pool: Pool
    store: ResourceStore
    tokens: PageTokens
    valkey: Any
    credentials: ReloadableServerCredentials
    kinds: frozenset[str]
    started_at: datetime
    schema_version: int
    issuer_kind: str
    listen_address: str = ""
    extras: dict[str, Any] = field(default_factory=dict)
    #: Issuer, renewal state and deny list (None only in tests that build a Runtime).
    certificates: NodeCertificates | None = None
    #: Calls to peers for fanned-out queries (None only in tests that build a Runtime).
    federation: Federation | None = None


def local_node(data_dir: Path, who: str = "admin") -> tuple[str, Credentials]:
    """Address of the node running on `data_dir` and the local `who` credentials to call it.

    For the CLI: reads data_dir/node.json (written once the node serves) and the local
    admin or client certificate. Raises Unavailable with the fix when the node is not up.
    """
    paths = NodePaths(data_dir)
    files = paths.admin if who == "admin" else paths.client
    try:
        state = json.loads(paths.state_file.read_text())
        creds = Credentials.from_files(files.ca, files.cert, files.key)
    except (OSError, ValueError):
        raise Unavailable(
            f"no running node under {data_dir} (node.json or the {who} certificate is "
            "missing); start it with `tessera serve` or pass --data-dir") from None
    return str(state["address"]), creds

