"""A peer's write is refused when the resource's new values would leave its grant's scope.

`check_write` guards resource.put from a peer: whatever the peer sends (kind, workspace,
team, owner) must be something it could read back, with the stable reason of the first
condition that fails.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tessera.core.errors import PermissionDenied
from tessera.grants import Grant, Scope

NEVER = frozenset({"credential"})
SCOPE = Scope.of(Grant(name="grants/g", peer="p", kinds=frozenset({"task", "credential"}),
                       workspaces=frozenset({"w1"}), teams=frozenset({"t1"}),
                       subject_user="ann"), NEVER)
INSIDE = {"workspace": "w1", "kind": "task", "team": "t1", "owner": "bob"}


def refusal(s: Scope, **values: str) -> PermissionDenied:
    with pytest.raises(PermissionDenied) as err:
        s.check_write(**(INSIDE | values))
    return err.value


def test_a_resource_inside_the_scope_may_be_written() -> None:
    SCOPE.check_write(**INSIDE)


@pytest.mark.parametrize(("values", "reason", "message"), [
    ({"kind": "note"}, "KIND_NOT_GRANTED", "the grant does not include kind 'note'"),
    ({"kind": "credential"}, "KIND_NOT_GRANTED", "the grant does not include kind 'credential'"),
    ({"workspace": "w2"}, "WORKSPACE_NOT_GRANTED",
     "the grant does not include workspace 'w2'"),
    ({"team": "t2"}, "TEAM_NOT_GRANTED", "the resource would be outside the grant's scope"),
    ({"team": ""}, "TEAM_NOT_GRANTED", "the resource would be outside the grant's scope"),
    ({"owner": "ann"}, "PERSONAL_DATA", "the resource would be outside the grant's scope"),
])
def test_each_way_out_of_the_scope_is_refused_with_its_reason(
        values: dict[str, str], reason: str, message: str) -> None:
    err = refusal(SCOPE, **values)
    assert (err.reason, err.message) == (reason, message)


def test_empty_values_do_not_mean_any_on_a_write() -> None:
    # A read may leave kind or workspace empty to mean "any"; a written resource cannot:
    # an empty kind or workspace is a value, and it is not in the scope.
    assert refusal(SCOPE, kind="").reason == "KIND_NOT_GRANTED"
    assert refusal(SCOPE, workspace="").reason == "WORKSPACE_NOT_GRANTED"


def test_the_first_failing_condition_names_the_refusal() -> None:
    assert refusal(SCOPE, kind="note", workspace="w2", team="t2",
                   owner="ann").reason == "KIND_NOT_GRANTED"
    assert refusal(SCOPE, workspace="w2", team="t2", owner="ann").reason == \
        "WORKSPACE_NOT_GRANTED"
    assert refusal(SCOPE, team="t2", owner="ann").reason == "TEAM_NOT_GRANTED"


def test_own_personal_data_is_writable_when_the_grant_includes_it() -> None:
    s = Scope.of(Grant(name="grants/g", peer="p", kinds=frozenset({"task"}),
                       workspaces=frozenset({"*"}), subject_user="ann",
                       include_personal=True), NEVER)
    s.check_write(workspace="anywhere", kind="task", team="", owner="ann")


kinds = st.sampled_from(("task", "note", "credential", ""))
places = st.sampled_from(("w1", "w2", ""))
teams = st.sampled_from(("t1", "t2", ""))
owners = st.sampled_from(("ann", "bob", ""))


@given(kinds, places, teams, owners)
def test_a_write_is_allowed_exactly_when_the_row_would_be_readable(
        kind: str, workspace: str, team: str, owner: str) -> None:
    values: dict[str, Any] = {"workspace": workspace, "kind": kind, "team": team,
                              "owner": owner}
    readable = SCOPE.decide(**values)
    try:
        SCOPE.check_write(**values)
    except PermissionDenied as err:
        assert not readable.allowed
        # An empty kind is checked after the workspace (the read check reads it as "any"),
        # so only then may the named reason differ from decide()'s first one.
        if kind:
            assert err.reason == readable.reason
    else:
        assert readable.allowed
