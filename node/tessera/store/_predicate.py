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
