"""The one way the CLI reaches the local node: its address and local credentials."""

from __future__ import annotations

import json
from pathlib import Path

from tessera.core.errors import Unavailable
from tessera.core.paths import NodePaths
from tessera_client import Credentials


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

