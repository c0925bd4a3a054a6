"""Unit tests of tessera.peering: service."""

from __future__ import annotations

import pytest

from tessera.core.errors import InvalidArgument
from tessera.peering import check_csr
from tessera.pki import IdentityKind, SpiffeId, new_key_and_csr

INVITED = SpiffeId("b.example", IdentityKind.NODE, "a")


def test_only_a_csr_naming_exactly_the_invited_identity_is_accepted() -> None:
    check_csr(new_key_and_csr(INVITED, common_name=False).csr_pem, INVITED)
    for csr in (
        new_key_and_csr(SpiffeId("b.example", IdentityKind.NODE, "other"),
                        common_name=False).csr_pem,
        new_key_and_csr(SpiffeId("b.example", IdentityKind.ADMIN, "a"),
                        common_name=False).csr_pem,
        new_key_and_csr(INVITED, dns_names=("localhost",), common_name=False).csr_pem,
        new_key_and_csr(INVITED, ip_addresses=("127.0.0.1",), common_name=False).csr_pem,
        # A CN is refused: clients fall back to it when matching host names.
        new_key_and_csr(INVITED).csr_pem,
        b"not a csr",
    ):
        with pytest.raises(InvalidArgument) as err:
            check_csr(csr, INVITED)
        assert [v.field for v in err.value.violations] == ["csr_pem"]
