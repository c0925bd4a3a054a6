"""Peering: single-use enrolment tokens, the enrolment listener, joining a peer."""

from tessera.peering._flood import FloodGuard, Rate, source_of
from tessera.peering._join import OutboundPeer, join, load_outbound, peers_dir
from tessera.peering._renew import PeerCertificateRenewal, PeerCertState, PeerCertStatus
from tessera.peering._service import (
    DEFAULT_TOKEN_TTL,
    MAX_TOKEN_TTL,
    Enrolled,
    Invited,
    Peering,
    check_csr,
    token_key,
)
from tessera.peering._token import Invitation, TokenError, TokenForged

__all__ = [
    "DEFAULT_TOKEN_TTL",
    "MAX_TOKEN_TTL",
    "Enrolled",
    "FloodGuard",
    "Invitation",
    "Invited",
    "OutboundPeer",
    "PeerCertState",
    "PeerCertStatus",
    "PeerCertificateRenewal",
    "Peering",
    "Rate",
    "TokenError",
    "TokenForged",
    "check_csr",
    "join",
    "load_outbound",
    "peers_dir",
    "source_of",
    "token_key",
]
