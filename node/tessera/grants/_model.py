"""Plain values of the trust boundary: peers and grants, as stored."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

#: The workspace wildcard of a grant: every workspace.
ALL_WORKSPACES = "*"


class PeerState(enum.StrEnum):
    """Lifecycle of a peer; only ACTIVE peers are admitted."""

    INVITED = "INVITED"
    ACTIVE = "ACTIVE"
    SUSPENDED = "SUSPENDED"
    REVOKED = "REVOKED"


@dataclass(frozen=True)
class Peer:
    """A node that may call this one (after enrolment) under a grant."""

    name: str
    identity: str
    address: str
    state: PeerState
    certificate_serial: str
    state_reason: str
    created_at: datetime
    updated_at: datetime
    #: When the certificate last issued to the peer expires (None before enrolment).
    certificate_not_after: datetime | None = None
    #: The serial before `certificate_serial`, which may still renew once.
    previous_certificate_serial: str = ""


@dataclass(frozen=True)
class Grant:
    """What one peer may do on this node. Everything not named here is denied."""

    name: str
    peer: str
    kinds: frozenset[str]
    excluded_kinds: frozenset[str] = frozenset()
    #: Workspaces readable; ALL_WORKSPACES means every one. Empty with `teams` set means
    #: "these teams, in any workspace"; both empty means nothing.
    workspaces: frozenset[str] = frozenset()
    #: Teams readable; empty means any team within the workspaces.
    teams: frozenset[str] = frozenset()
    #: User whose personal data (resources they own) is withheld unless include_personal.
    subject_user: str = ""
    include_personal: bool = False
    #: Most rows one query may return; 0 means only the node's page-size limit applies.
    row_cap: int = 0
    command_types: frozenset[str] = frozenset()
    event_types: frozenset[str] = frozenset()
    #: Rate limit for the limiter; 0 means the node default.
    rate_per_s: float = 0.0
    burst: int = 0
    expire_time: datetime | None = None
    created_at: datetime | None = None
    revoked_at: datetime | None = None
    #: Most rows readable under this grant within any `row_budget_window_s` seconds,
    #: across replicas; 0 means no budget.
    row_budget: int = 0
    row_budget_window_s: int = 0

    @property
    def revoked(self) -> bool:
        """True once revoked."""
        return self.revoked_at is not None
