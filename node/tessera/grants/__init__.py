"""Grants and scope enforcement: what a peer may read and do on this node."""

from tessera.grants._model import ALL_WORKSPACES, Grant, Peer, PeerState
from tessera.grants._scope import DELETE, PUT, Decision, Scope
from tessera.grants._store import Admitted, GrantStore

__all__ = [
    "ALL_WORKSPACES",
    "DELETE",
    "PUT",
    "Admitted",
    "Decision",
    "Grant",
    "GrantStore",
    "Peer",
    "PeerState",
    "Scope",
]
