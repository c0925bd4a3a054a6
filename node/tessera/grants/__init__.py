"""Grants and scope enforcement: what a peer may read and do on this node."""

from tessera.grants._model import ALL_WORKSPACES, Grant, Peer, PeerState
from tessera.grants._scope import DELETE, PUT, Decision, Scope
from tessera.grants._store import GRANTS_CHANNEL, Admitted, GrantStore

__all__ = [
    "ALL_WORKSPACES",
    "DELETE",
    "GRANTS_CHANNEL",
    "PUT",
    "Admitted",
    "Decision",
    "Grant",
    "GrantStore",
    "Peer",
    "PeerState",
    "Scope",
]
