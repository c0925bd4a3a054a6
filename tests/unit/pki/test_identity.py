"""Unit tests of tessera.pki: identity."""

from __future__ import annotations

import pytest

from tessera.pki import SpiffeId


@pytest.mark.parametrize("uri", [
    "spiffe://d.example/node/a", "spiffe://d/client/tool-1", "spiffe://d/admin/root.x"])
def test_spiffe_ids_parse_and_print_back(uri: str) -> None:
    assert SpiffeId.parse(uri).uri == uri


@pytest.mark.parametrize("uri", [
    "spiffe://d/robot/a", "https://d/node/a", "spiffe://d/node/", "spiffe://d/node/a/b",
    "spiffe://D/node/a", "spiffe://d/node/a?x=1"])
def test_invalid_spiffe_ids_are_refused(uri: str) -> None:
    with pytest.raises(ValueError):
        SpiffeId.parse(uri)
