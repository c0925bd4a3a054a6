"""What a peer is told when a scope refuses: the stable reason and the message.

The reason goes into the audit log and `google.rpc.ErrorInfo`; the message into the
status. Both must name the condition that failed (and only what the caller sent).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tessera.core.errors import PermissionDenied
from tessera.grants import Grant, Scope

NEVER = frozenset({"credential"})
SCOPE = Scope.of(Grant(name="grants/g", peer="p", kinds=frozenset({"task"}),
                       workspaces=frozenset({"w1"}), teams=frozenset({"t1"}),
                       subject_user="ann", command_types=frozenset({"resource.put"})), NEVER)


def first_failure(workspace: str, kind: str, team: str, owner: str) -> str:
    """The reason for the first condition SCOPE's grant does not meet, in decide()'s order."""
    if kind != "task":
        return "KIND_NOT_GRANTED"
    if workspace != "w1":
        return "WORKSPACE_NOT_GRANTED"
    if team != "t1":
        return "TEAM_NOT_GRANTED"
    if owner == "ann":
        return "PERSONAL_DATA"
    return ""


@given(st.sampled_from(("w1", "w2", "")), st.sampled_from(("task", "note", "credential")),
       st.sampled_from(("t1", "t2", "")), st.sampled_from(("ann", "bob", "")))
def test_decide_names_the_first_condition_that_fails(
        workspace: str, kind: str, team: str, owner: str) -> None:
    d = SCOPE.decide(workspace=workspace, kind=kind, team=team, owner=owner)
    assert (d.allowed, d.reason) == (first_failure(workspace, kind, team, owner) == "",
                                     first_failure(workspace, kind, team, owner))


def test_a_workspace_outside_a_named_set_is_its_own_reason() -> None:
    d = SCOPE.decide(workspace="w2", kind="task", team="t1", owner="bob")
    assert (d.allowed, d.reason) == (False, "WORKSPACE_NOT_GRANTED")


def denial(call: object, *args: object, **kwargs: object) -> tuple[str, str]:
    with pytest.raises(PermissionDenied) as err:
        call(*args, **kwargs)  # type: ignore[operator]
    return err.value.reason, err.value.message


def test_a_read_naming_a_kind_or_workspace_outside_says_which() -> None:
    assert denial(SCOPE.check_read, workspace="w1", kind="note") == (
        "KIND_NOT_GRANTED", "the grant does not include kind 'note'")
    assert denial(SCOPE.check_read, workspace="w2", kind="task") == (
        "WORKSPACE_NOT_GRANTED", "the grant does not include workspace 'w2'")
    # The kind is checked first; empty values mean "any" and are left to the predicate.
    assert denial(SCOPE.check_read, workspace="w2", kind="note")[0] == "KIND_NOT_GRANTED"
    SCOPE.check_read(workspace="", kind="")
    SCOPE.check_read(workspace="w1", kind="task")


def test_a_command_outside_the_grant_is_named() -> None:
    SCOPE.check_command("resource.put")
    assert denial(SCOPE.check_command, "resource.delete") == (
        "COMMAND_NOT_GRANTED", "the grant does not allow command 'resource.delete'")


def test_a_peer_may_not_fan_out() -> None:
    SCOPE.check_sources(local=True)
    assert denial(SCOPE.check_sources, local=False) == (
        "FANOUT_NOT_ALLOWED", "a peer's call cannot fan out to other sources")
