"""Unit tests of tessera.grants: scope."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tessera.core.errors import PermissionDenied
from tessera.grants import Grant, Scope
from tessera.store import NOTHING
from tests.fixtures.grants import KINDS, NEVER, TEAMS, USERS, WORKSPACES, grant_strategy

grants = grant_strategy(
    "grants/00000000-0000-0000-0000-000000000001",
    row_cap=st.integers(0, 50),
    command_types=st.frozensets(st.sampled_from(("resource.put", "resource.delete"))),
)


resources = st.tuples(st.sampled_from(WORKSPACES), st.sampled_from(KINDS),
                      st.sampled_from(TEAMS), st.sampled_from(USERS))


def reference(g: Grant, workspace: str, kind: str, team: str, owner: str) -> bool:
    """Default deny, written out plainly: every condition must hold."""
    names_a_place = bool(g.workspaces) or bool(g.teams)
    kind_ok = kind in g.kinds and kind not in g.excluded_kinds and kind not in NEVER
    workspace_ok = "*" in g.workspaces or workspace in g.workspaces or not g.workspaces
    team_ok = not g.teams or team in g.teams
    personal_ok = g.include_personal or not g.subject_user or owner != g.subject_user
    return names_a_place and kind_ok and workspace_ok and team_ok and personal_ok


def grant(**fields: object) -> Grant:
    base = Grant(name="grants/x", peer="p", kinds=frozenset({"task"}),
                 workspaces=frozenset({"w1"}))
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


@given(grants, st.lists(resources, max_size=30))
def test_scope_decisions_equal_the_reference_evaluator(
    g: Grant, rows: list[tuple[str, str, str, str]]
) -> None:
    scope = Scope.of(g, NEVER)
    for ws, kind, team, owner in rows:
        decision = scope.decide(workspace=ws, kind=kind, team=team, owner=owner)
        assert decision.allowed == reference(g, ws, kind, team, owner)
        assert decision.allowed == (decision.reason == "")


@given(grants, st.sampled_from(("", *WORKSPACES)), st.sampled_from(("", *KINDS)))
def test_read_requests_are_refused_exactly_when_they_name_something_outside(
    g: Grant, ws: str, kind: str
) -> None:
    scope = Scope.of(g, NEVER)
    kinds = g.kinds - g.excluded_kinds - NEVER if (g.workspaces or g.teams) else set()
    all_ws = "*" in g.workspaces or (not g.workspaces and bool(g.teams))
    outside = (kind and kind not in kinds) or (ws and not all_ws and ws not in g.workspaces)
    if outside:
        with pytest.raises(PermissionDenied) as err:
            scope.check_read(workspace=ws, kind=kind)
        assert err.value.reason in ("KIND_NOT_GRANTED", "WORKSPACE_NOT_GRANTED")
    else:
        scope.check_read(workspace=ws, kind=kind)


@given(grants, st.integers(1, 1000))
def test_every_page_is_bounded_by_the_row_cap(g: Grant, requested: int) -> None:
    size = Scope.of(g, NEVER).page_size(requested)
    assert 1 <= size <= requested
    assert size == (min(requested, g.row_cap) if g.row_cap else requested)


@given(grants)
def test_predicate_keeps_nothing_when_no_kind_is_readable(g: Grant) -> None:
    scope = Scope.of(g, NEVER)
    assert (scope.predicate() is NOTHING) == (not scope.kinds or scope.workspaces == frozenset())
    if scope.predicate() is not NOTHING:
        # Every set the scope limits by is passed as a parameter, never spliced into SQL.
        params = scope.predicate().params
        assert sorted(scope.kinds) in params


def test_never_shared_and_excluded_kinds_win_over_granted_kinds() -> None:
    scope = Scope.of(grant(kinds=frozenset({"task", "credential", "note"}),
                           excluded_kinds=frozenset({"note"})), NEVER)
    assert scope.kinds == {"task"}
    for kind in ("credential", "note"):
        assert scope.decide(workspace="w1", kind=kind, team="", owner="").reason == \
            "KIND_NOT_GRANTED"


def test_a_grant_naming_no_workspace_or_team_grants_nothing() -> None:
    scope = Scope.of(grant(workspaces=frozenset()), NEVER)
    assert not scope.decide(workspace="w1", kind="task", team="", owner="").allowed
    assert scope.predicate() is NOTHING


def test_a_team_only_grant_reads_those_teams_in_every_workspace() -> None:
    scope = Scope.of(grant(workspaces=frozenset(), teams=frozenset({"t1"})), NEVER)
    assert scope.decide(workspace="w3", kind="task", team="t1", owner="").allowed
    assert scope.decide(workspace="w3", kind="task", team="t2", owner="").reason == \
        "TEAM_NOT_GRANTED"


def test_personal_rows_are_withheld_only_for_a_named_subject() -> None:
    withheld = Scope.of(grant(subject_user="ann"), NEVER)
    assert withheld.decide(workspace="w1", kind="task", team="", owner="ann").reason == \
        "PERSONAL_DATA"
    assert withheld.decide(workspace="w1", kind="task", team="", owner="").allowed
    nobody = Scope.of(grant(), NEVER)
    assert nobody.decide(workspace="w1", kind="task", team="", owner="").allowed
    included = Scope.of(grant(subject_user="ann", include_personal=True), NEVER)
    assert included.decide(workspace="w1", kind="task", team="", owner="ann").allowed


def test_commands_and_fan_out_are_denied_unless_granted() -> None:
    scope = Scope.of(grant(command_types=frozenset({"resource.put"})), NEVER)
    scope.check_command("resource.put")
    with pytest.raises(PermissionDenied) as err:
        scope.check_command("resource.delete")
    assert err.value.reason == "COMMAND_NOT_GRANTED"
    with pytest.raises(PermissionDenied) as err:
        scope.check_sources(local=False)
    assert err.value.reason == "FANOUT_NOT_ALLOWED"


def test_page_tokens_are_bound_to_the_grant() -> None:
    a = Scope.of(grant(name="grants/a"), NEVER)
    b = Scope.of(grant(name="grants/b"), NEVER)
    assert a.page_token_subject("spiffe://d/node/p") != b.page_token_subject("spiffe://d/node/p")


def test_the_scope_carries_the_grants_event_types() -> None:
    grant = Grant(name="grants/1", peer="p", kinds=frozenset({"task"}),
                  workspaces=frozenset({"w"}), event_types=frozenset({"task.*"}))
    assert Scope.of(grant, ()).event_types == frozenset({"task.*"})
