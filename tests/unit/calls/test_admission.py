"""Unit tests of tessera.calls: admission."""

from __future__ import annotations

import pytest

from tessera.calls import Access, authorize, required_access
from tessera.core import errors
from tessera.pki import IdentityKind, SpiffeId


def test_access_policy_by_identity_kind() -> None:
    admin = SpiffeId("d", IdentityKind.ADMIN, "a")
    client = SpiffeId("d", IdentityKind.CLIENT, "c")
    peer = SpiffeId("d", IdentityKind.NODE, "p")
    assert required_access("tessera.v1.AdminService", "GetNodeInfo") is Access.ADMIN
    assert required_access("grpc.health.v1.Health", "Check") is Access.ANY_AUTHENTICATED
    authorize(Access.ADMIN, admin)
    authorize(Access.LOCAL, client)
    for access, who in ((Access.ADMIN, client), (Access.ADMIN, peer), (Access.LOCAL, peer)):
        with pytest.raises(errors.PermissionDenied):
            authorize(access, who)
