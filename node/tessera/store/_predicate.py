"""An SQL condition on `resources` rows, pushed into the store's queries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import sql


@dataclass(frozen=True)
class Predicate:
    """A boolean SQL expression over the unqualified columns of `resources`, with params.

    The store ANDs it into the WHERE clause of reads and guarded writes, so rows outside
    it are never fetched (rather than fetched and filtered afterwards).
    """

    condition: sql.Composable
    params: Sequence[Any] = ()


#: The predicate that keeps nothing.
NOTHING = Predicate(sql.SQL("FALSE"))


def any_of(predicates: Sequence[Predicate]) -> Predicate:
    """Rows inside at least one of `predicates` (NOTHING for none)."""
    if not predicates:
        return NOTHING
    return Predicate(
        sql.SQL("(") + sql.SQL(" OR ").join(p.condition for p in predicates) + sql.SQL(")"),
        tuple(v for p in predicates for v in p.params))
