"""A grant's row cap bounds every page served to the peer; 0 means no cap of its own."""

from __future__ import annotations

import pytest

from tessera.grants import Grant, Scope


def scope(row_cap: int) -> Scope:
    return Scope.of(Grant(name="grants/g", peer="p", kinds=frozenset({"task"}),
                          workspaces=frozenset({"w1"}), row_cap=row_cap), ())


@pytest.mark.parametrize(("row_cap", "requested", "served"), [
    (0, 1, 1), (0, 500, 500),        # no cap: the request (already bounded by the node)
    (1, 1, 1), (1, 2, 1), (1, 500, 1),  # the smallest cap still caps
    (2, 1, 1), (2, 3, 2),
    (50, 49, 49), (50, 50, 50), (50, 51, 50),
])
def test_pages_are_cut_to_the_row_cap(row_cap: int, requested: int, served: int) -> None:
    assert scope(row_cap).page_size(requested) == served
