"""The SQL form of a scope keeps exactly the rows `decide()` allows.

`Scope.predicate()` is what the store ANDs into every peer read, so a wrong clause leaks
rows (or hides them) however right `decide()` is. Here the rendered SQL is evaluated over
generated rows by a small interpreter that understands only the clauses a predicate may
contain, and refuses anything else, so a changed operator, column, placeholder or
parameter fails the comparison instead of being read generously.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from hypothesis import given

from tessera.grants import Grant, Scope
from tessera.store import NOTHING, Predicate
from tests.fixtures.grants import KINDS, NEVER, TEAMS, USERS, WORKSPACES, grant_strategy

grants = grant_strategy()
Row = dict[str, str]
ROWS = [{"workspace": w, "kind": k, "team": t, "owner": o}
        for w in WORKSPACES for k in KINDS for t in TEAMS for o in USERS]

_ANY = re.compile(r"(kind|workspace|team) = ANY\(%s::text\[\]\)")
_NOT_EQUAL = re.compile(r"(owner) <> %s")


def compile_predicate(p: Predicate) -> Callable[[Row], bool]:
    """A row filter equivalent to the SQL, for the only shapes a predicate may take."""
    text = p.condition.as_string(None)
    params: Sequence[Any] = p.params
    if text == "FALSE":
        assert params == ()
        return lambda row: False
    assert text.startswith("(") and text.endswith(")"), text
    clauses = text[1:-1].split(" AND ")
    assert len(clauses) == len(params) == text.count("%s"), (text, params)
    tests: list[Callable[[Row], bool]] = []
    for clause, param in zip(clauses, params, strict=True):
        if m := _ANY.fullmatch(clause):
            column = m.group(1)
            assert isinstance(param, list) and all(isinstance(v, str) for v in param), param
            assert param == sorted(param), "sets are passed sorted, so statements repeat"
            tests.append(lambda row, c=column, vs=frozenset(param): row[c] in vs)
        elif m := _NOT_EQUAL.fullmatch(clause):
            column = m.group(1)
            assert isinstance(param, str), param
            tests.append(lambda row, c=column, v=param: row[c] != v)
        else:
            raise AssertionError(f"a clause no predicate should contain: {clause!r}")
    return lambda row: all(t(row) for t in tests)


@given(grants)
def test_the_sql_keeps_exactly_the_rows_decide_allows(g: Grant) -> None:
    scope = Scope.of(g, NEVER)
    keep = compile_predicate(scope.predicate())
    for row in ROWS:
        assert keep(row) == scope.decide(**row).allowed, row


def scope(**fields: Any) -> Scope:
    base: dict[str, Any] = {"name": "grants/g", "peer": "p", "kinds": frozenset({"task"}),
                            "workspaces": frozenset({"w1"})}
    return Scope.of(Grant(**(base | fields)), NEVER)


def rendered(s: Scope) -> tuple[str, tuple[Any, ...]]:
    p = s.predicate()
    return p.condition.as_string(None), tuple(p.params)


def test_every_limit_is_a_bound_parameter_in_a_fixed_order() -> None:
    s = scope(kinds=frozenset({"task", "note", "credential"}),
              workspaces=frozenset({"w2", "w1"}), teams=frozenset({"t2", "t1"}),
              subject_user="ann")
    assert rendered(s) == (
        "(kind = ANY(%s::text[]) AND workspace = ANY(%s::text[]) AND team = ANY(%s::text[])"
        " AND owner <> %s)",
        (["note", "task"], ["w1", "w2"], ["t1", "t2"], "ann"),
    )


def test_unlimited_dimensions_add_no_clause() -> None:
    # Every workspace, any team, personal data included: only the kinds narrow the rows.
    assert rendered(scope(workspaces=frozenset({"*"}), subject_user="ann",
                          include_personal=True)) == (
        "(kind = ANY(%s::text[]))", (["task"],))
    # A team-only grant reads those teams in every workspace.
    assert rendered(scope(workspaces=frozenset(), teams=frozenset({"t1"}))) == (
        "(kind = ANY(%s::text[]) AND team = ANY(%s::text[]))", (["task"], ["t1"]))


def test_a_subject_value_is_never_spliced_into_the_sql() -> None:
    hostile = "x' OR TRUE --"
    text, params = rendered(scope(subject_user=hostile, kinds=frozenset({hostile})))
    assert hostile not in text
    assert params == ([hostile], ["w1"], hostile)


def test_a_scope_with_nothing_readable_keeps_no_row() -> None:
    assert scope(kinds=frozenset({"credential"})).predicate() is NOTHING
    assert scope(workspaces=frozenset()).predicate() is NOTHING
    # A scope built by hand with no workspace at all must not fall back to "every workspace".
    empty = Scope("grants/g", frozenset({"task"}), frozenset(), frozenset(), "", False, 0,
                  frozenset())
    assert empty.predicate() is NOTHING
    assert not any(compile_predicate(empty.predicate())(row) for row in ROWS)
