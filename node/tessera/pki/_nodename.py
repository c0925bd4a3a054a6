"""The node's name when none is configured: derived once, then kept in the data directory.

Every node used to default to `tessera`, so two default nodes presented the same identity
name to each other and to anyone peering with both. A node without `node.name` now takes
its host name plus a short random suffix at first start and saves it (data_dir/node-name),
so it keeps one name for its life and two default nodes never collide.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import socket
from pathlib import Path

from tessera.config import Config
from tessera.core.errors import Unauthenticated
from tessera.pki._files import write_atomic
from tessera.pki._identity import IdentityKind, identity_from_pem

#: Where the derived name is kept.
NAME_FILE = "node-name"
_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?")


def derive_name(hostname: str, suffix: str) -> str:
    """`<host>-<suffix>` as a valid node name (the host's first label, cleaned, shortened)."""
    label = hostname.split(".", 1)[0].lower()
    label = re.sub(r"[^a-z0-9-]+", "-", label).strip("-")[:48].strip("-") or "node"
    return f"{label}-{suffix}"


def _existing_name(data_dir: Path) -> str:
    """The name in an existing node certificate, so an upgraded node keeps its identity."""
    cert = data_dir / "pki" / "node.crt"
    try:
        ident = identity_from_pem(cert.read_bytes()).identity
    except (OSError, Unauthenticated):
        return ""
    return ident.name if ident.kind is IdentityKind.NODE else ""


def resolve_node_name(cfg: Config) -> Config:
    """`cfg` with `node.name` set: as configured, else saved, else derived and saved now."""
    if cfg.node.name:
        return cfg
    path = cfg.node.data_dir / NAME_FILE
    try:
        name = path.read_text().strip()
    except FileNotFoundError:
        name = ""
    if not _NAME_RE.fullmatch(name):
        name = _existing_name(cfg.node.data_dir) or \
            derive_name(socket.gethostname(), secrets.token_hex(3))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (name + "\n").encode())
    return dataclasses.replace(cfg, node=dataclasses.replace(cfg.node, name=name))
