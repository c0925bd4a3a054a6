"""Unit tests of tessera.events: patterns."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tessera.events import (
    like_of,
    matches,
    matches_any,
    pattern_problem,
    type_problem,
)

KINDS = frozenset({"task", "note"})


def _like(like: str, text: str) -> bool:
    """SQL LIKE with backslash escapes, evaluated in Python (the reference semantics)."""
    out, i = [], 0
    while i < len(like):
        ch = like[i]
        if ch == "\\" and i + 1 < len(like):
            out.append(re.escape(like[i + 1]))
            i += 2
            continue
        out.append(".*" if ch == "%" else "." if ch == "_" else re.escape(ch))
        i += 1
    return re.fullmatch("".join(out), text, re.S) is not None


_segment = st.text(alphabet="abc_-.*", min_size=1, max_size=8)


@pytest.mark.parametrize("good", ["task.done", "billing.invoice.paid", "a-b.c_d", "x.1"])
def test_application_types_in_dot_notation_are_accepted(good: str) -> None:
    assert type_problem(good, KINDS) is None


@pytest.mark.parametrize(("bad", "says"), [
    ("", "required"),
    ("task", "dot notation"),
    ("Task.done", "dot notation"),
    ("task..done", "dot notation"),
    ("task.done.", "dot notation"),
    ("task.*", "dot notation"),
    ("a." + "b" * 127, "dot notation"),
    ("resource.put", "reserved"),
    ("operation.done", "reserved"),
    ("agent.spawn", "reserved"),
    ("task.put", "reserved"),
    ("note.delete", "reserved"),
])
def test_malformed_and_reserved_types_are_refused_with_the_rule(bad: str, says: str) -> None:
    problem = type_problem(bad, KINDS)
    assert problem is not None and says in problem


def test_a_put_suffix_of_a_kind_the_node_does_not_store_is_an_application_type() -> None:
    assert type_problem("build.put", KINDS) is None


@pytest.mark.parametrize(("pattern", "event_type", "expected"), [
    ("*", "task.done", True),
    ("task.*", "task.done", True),
    ("task.*", "task.step.done", True),
    ("task.*", "task", False),
    ("task.*", "tasks.done", False),
    ("task.done", "task.done", True),
    ("task.done", "task.doner", False),
    ("*.done", "build.done", True),
    ("task_x.*", "taskax.done", False),  # '_' is literal, not LIKE's any-character
])
def test_patterns_match_types(pattern: str, event_type: str, expected: bool) -> None:
    assert matches(pattern, event_type) is expected
    assert _like(like_of(pattern), event_type) is expected


def test_matches_any_needs_one_match() -> None:
    assert matches_any(["note.*", "task.*"], "task.done")
    assert not matches_any(["note.*"], "task.done")
    assert not matches_any([], "task.done")


@pytest.mark.parametrize("bad", ["", "Task.*", "task.%", "a" * 129, "task done"])
def test_malformed_patterns_are_refused(bad: str) -> None:
    assert pattern_problem(bad) is not None


@given(pattern=_segment, event_type=st.text(alphabet="abc_-.", min_size=1, max_size=12))
def test_the_sql_form_of_a_pattern_agrees_with_matching(pattern: str, event_type: str) -> None:
    assert _like(like_of(pattern), event_type) == matches(pattern, event_type)
