"""Grants and scope enforcement: what a peer may read and do on this node."""

from tessera.grants._admission import PEER_METHODS, GrantAdmission, peer_scope
from tessera.grants._model import ALL_WORKSPACES, Grant, Peer, PeerState
from tessera.grants._scope import DELETE, PUT, Decision, Scope
from tessera.grants._store import Admitted, GrantStore

__all__ = [
    "ALL_WORKSPACES",
    "DELETE",
    "PEER_METHODS",
    "PUT",
    "Admitted",
    "Decision",
    "Grant",
    "GrantAdmission",
    "GrantStore",
    "Peer",
    "PeerState",
    "Scope",
    "peer_scope",
]
