"""Where a node keeps its files: one `NodePaths` per data directory, resolved once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CredentialFiles:
    """Where one identity's key, chain and trust roots live."""

    cert: Path
    key: Path
    ca: Path


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
    def deny_list(self) -> Path:
        """Serials revoked through this node, one decimal serial per line."""
        return self.pki / "denied_serials.txt"

    @property
    def decommissioned(self) -> Path:
        """Serials revoked with `certs revoke --decommission`: never re-enrolled."""
        return self.pki / "decommissioned_serials.txt"

    @property
    def crl(self) -> Path:
        """The last CRL put in force (DER), loaded again at start."""
        return self.pki / "crl.der"

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
    def peers(self) -> Path:
        """Credentials this node holds for calling its peers, one folder per peer."""
        return self.data_dir / "peers"

    @property
    def state_file(self) -> Path:
        """Written once the node is ready: its address and the files to call it with."""
        return self.data_dir / "node.json"

    @property
    def lock_file(self) -> Path:
        """Held (flock) by the node's supervisor for its whole life; holds its pid."""
        return self.data_dir / "node.lock"

    @property
    def run(self) -> Path:
        """Runtime files of the running node (removed or rewritten at each start)."""
        return self.data_dir / "run"

    @property
    def supervisor_state(self) -> Path:
        """The supervisor's view of its children: pids, restarts, last exits."""
        return self.run / "supervisor.json"
