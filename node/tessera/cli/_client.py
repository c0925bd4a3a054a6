"""The one way the CLI reaches the local node: its address and local credentials."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tessera.core.errors import Unavailable
from tessera.core.paths import NodePaths
from tessera.embedded import pid_alive
from tessera_client import Credentials


def node_state(data_dir: Path) -> dict[str, Any]:
    """node.json of the node running on `data_dir`.

    Raises Unavailable with the fix when there is none, or when it is stale: the node
    that wrote it (a pid no longer running) was killed without cleaning up.
    """
    paths = NodePaths(data_dir)
    try:
        state: dict[str, Any] = json.loads(paths.state_file.read_text())
    except (OSError, ValueError):
        raise Unavailable(
            f"no running node under {data_dir} (no node.json); start it with "
            "`tessera serve` or pass --data-dir") from None
    pid = state.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        raise Unavailable(
            f"{paths.state_file} is stale: the node that wrote it (pid {pid}) is not "
            "running; start it with `tessera serve`") from None
    return state


def local_node(data_dir: Path, who: str = "admin") -> tuple[str, Credentials]:
    """Address of the node running on `data_dir` and the local `who` credentials to call it.

    For the CLI: reads data_dir/node.json (written once the node serves) and the local
    admin or client certificate. Raises Unavailable with the fix when the node is not up.
    """
    paths = NodePaths(data_dir)
    files = paths.admin if who == "admin" else paths.client
    state = node_state(data_dir)
    try:
        creds = Credentials.from_files(files.ca, files.cert, files.key)
    except (OSError, ValueError):
        raise Unavailable(
            f"the local {who} certificate under {paths.pki} is missing or unreadable; "
            "start the node once with `tessera serve` to issue it") from None
    return str(state["address"]), creds
