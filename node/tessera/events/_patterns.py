"""Event types and type patterns: validation, matching and their SQL form. Pure functions.

A type is dot notation, at least two segments of [a-z0-9_-], 1-128 characters
("task.done", "billing.invoice.paid"). A pattern is a type in which `*` matches any run of
characters, dots included: `task.*` matches "task.done" and "task.step.done", `*` matches
every type. Grants list their event types in the same pattern form.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable

TYPE_RE = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)+$")
PATTERN_RE = re.compile(r"^[a-z0-9._*-]+$")
MAX_TYPE = 128
#: Prefixes only the node itself writes.
RESERVED_PREFIXES = ("resource.", "operation.", "agent.")
#: Suffixes of the events every resource write appends: "<kind>.put", "<kind>.delete".
RESOURCE_ACTIONS = ("put", "delete")


def type_problem(event_type: str, kinds: Collection[str] = ()) -> str | None:
    """Why an application may not publish this type, or None if it may."""
    if not event_type:
        return "is required"
    if len(event_type) > MAX_TYPE or not TYPE_RE.match(event_type):
        return ("must be dot notation: 1-128 characters, at least two segments of "
                "[a-z0-9_-] separated by '.', e.g. task.done")
    if event_type.startswith(RESERVED_PREFIXES):
        return f"is reserved for the node ({', '.join(p + '*' for p in RESERVED_PREFIXES)})"
    kind, _, action = event_type.rpartition(".")
    if kind in kinds and action in RESOURCE_ACTIONS:
        return f"is reserved for the node: every write of a {kind} appends {event_type}"
    return None


def pattern_problem(pattern: str) -> str | None:
    """Why a type pattern is malformed, or None."""
    if not pattern:
        return "must not be empty"
    if len(pattern) > MAX_TYPE or not PATTERN_RE.match(pattern):
        return "must be 1-128 characters of [a-z0-9._-] and '*', e.g. task.* or *"
    return None


def matches(pattern: str, event_type: str) -> bool:
    """Whether a type matches one pattern (`*` = any characters, dots included)."""
    return re.fullmatch(".*".join(re.escape(p) for p in pattern.split("*")),
                        event_type) is not None


def matches_any(patterns: Iterable[str], event_type: str) -> bool:
    """Whether a type matches at least one of the patterns."""
    return any(matches(p, event_type) for p in patterns)


def like_of(pattern: str) -> str:
    """The pattern as an SQL LIKE pattern with the default escape character (backslash)."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%")
