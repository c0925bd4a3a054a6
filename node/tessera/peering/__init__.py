"""Peering: single-use enrolment tokens, the enrolment listener, joining a peer."""

from tessera.peering._join import OutboundPeer, join, load_outbound, peers_dir
from tessera.peering._listener import enroll_pb, start_enroll_listener
from tessera.peering._node import attach, grant_store_of, peering_of, start_enrolment
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
    "Invitation",
    "Invited",
    "OutboundPeer",
    "Peering",
    "TokenError",
    "TokenForged",
    "attach",
    "check_csr",
    "enroll_pb",
    "grant_store_of",
    "join",
    "load_outbound",
    "peering_of",
    "peers_dir",
    "start_enroll_listener",
    "start_enrolment",
    "token_key",
]
