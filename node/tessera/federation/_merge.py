"""Merging answers from several sources: pure functions over plain values."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def merge_sorted(
    pages: Iterable[tuple[str, Sequence[T]]],
    key: Callable[[str, T], Any],
    *,
    limit: int,
    reverse: bool = False,
) -> list[tuple[str, T]]:
    """The first `limit` rows of all pages in `key` order, each paired with its source.

    Ties keep source order (Python's sort is stable), so "local" listed first wins them.
    """
    rows = [(source, row) for source, page in pages for row in page]
    rows.sort(key=lambda sr: key(sr[0], sr[1]), reverse=reverse)
    return rows[:limit]
