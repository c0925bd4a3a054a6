"""The one way the CLI reaches a node: `local_node()` (SPIRE's `util.NewServerClient`).

Every command that calls a node gets its address and credentials here, from the data
directory's node.json and the local admin or client certificate, and opens its client or
channel from the `LocalNode` this returns. Doctor reads node.json through `node_state()`.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tessera.core.errors import Unavailable
from tessera.core.net import split_host_port
from tessera.core.paths import NodePaths
from tessera.embedded import pid_alive
from tessera_client import AsyncClient, AsyncFollowingChannel, Client, Credentials

Who = Literal["admin", "client"]


class NoNode(Unavailable):
    """No node.json under the data directory: no node has served there (or it stopped)."""


def _answers(address: str, timeout_s: float = 2.0) -> str | None:
    """None if something accepts TCP connections at host:port, else why not."""
    try:
        host, port = split_host_port(address)
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except ValueError:
        return f"{address!r} is not host:port"
    except ConnectionRefusedError:
        return "nothing listens there"
    except TimeoutError:
        return f"no answer in {timeout_s:g} s"
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def node_state(data_dir: Path, *, probe: bool = True) -> dict[str, Any]:
    """node.json of the node running on `data_dir`.

    Raises NoNode when there is none, Unavailable with the fix when it is stale (the node
    that wrote it, a pid no longer running, was killed without cleaning up), or, with
    `probe`, when nothing answers at its address: one line that says so, not gRPC
    transport text.
    """
    paths = NodePaths(data_dir)
    try:
        state: dict[str, Any] = json.loads(paths.state_file.read_text())
    except (OSError, ValueError):
        raise NoNode(
            f"no running node under {data_dir} (no node.json); start it with "
            "`tessera serve` or pass --data-dir") from None
    pid = state.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        raise Unavailable(
            f"{paths.state_file} is stale: the node that wrote it (pid {pid}) is not "
            "running; start it with `tessera serve`") from None
    why = _answers(str(state.get("address", ""))) if probe else None
    if why is not None:
        raise Unavailable(
            f"the node of {data_dir} (pid {pid}) does not answer on {state.get('address')} "
            f"({why}); it may be starting or shutting down: `tessera doctor --data-dir "
            f"{data_dir}` shows its state; if it stays so, stop pid {pid} and start it "
            f"again with `tessera serve --data-dir {data_dir}`")
    return state


@dataclass(frozen=True)
class LocalNode:
    """Where to call a node and as whom; opens the sync/async clients and channels."""

    address: str
    credentials: Credentials
    #: The name the node's certificate is checked against (local certificates: localhost).
    server_name: str | None = "localhost"

    def client(self) -> Client:
        """A blocking client (a context manager)."""
        return Client(self.address, self.credentials, server_name=self.server_name)

    def async_client(self) -> AsyncClient:
        """An asyncio client (an async context manager)."""
        return AsyncClient(self.address, self.credentials, server_name=self.server_name)

    def channel(self) -> AsyncFollowingChannel:
        """An asyncio channel that follows the certificate's renewal, for raw stubs."""
        return AsyncFollowingChannel(self.address, self.credentials,
                                     server_name=self.server_name)


def local_node(data_dir: Path, who: Who = "admin", *, address: str | None = None,
               ca: str | None = None, cert: str | None = None,
               key: str | None = None) -> LocalNode:
    """The node running on `data_dir`, called with the local `who` credentials.

    `address`, `ca`, `cert` and `key` override what node.json and data_dir/pki say; with
    all four given no node.json is needed. Raises Unavailable (NoNode when there is no
    node.json) with the fix when the node is not up or the certificate is unreadable.
    """
    paths = NodePaths(data_dir)
    files = paths.admin if who == "admin" else paths.client
    if address and ca and cert and key:
        state: dict[str, Any] = {"address": address}
        server_name = None
    else:
        # With --address the node.json address is not the one called: not probed.
        state = node_state(data_dir, probe=not address)
        server_name = "localhost"
    try:
        creds = Credentials.from_files(ca or files.ca, cert or files.cert, key or files.key)
    except (OSError, ValueError):
        raise Unavailable(
            f"the local {who} certificate under {paths.pki} is missing or unreadable; "
            "start the node once with `tessera serve` to issue it") from None
    return LocalNode(address or str(state["address"]), creds, server_name)
