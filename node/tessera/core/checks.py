"""The outcome of one health check (doctor), shared by every component that reports one."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Level(enum.StrEnum):
    """Traffic light."""

    GREEN = "green"
    YELLOW = "yellow"
    RED = "red"


@dataclass(frozen=True)
class Check:
    """One check's outcome."""

    name: str
    level: Level
    message: str
    details: dict[str, Any] = field(default_factory=dict)


def worst(checks: list[Check]) -> Level:
    """The worst level among checks."""
    levels = {c.level for c in checks}
    for level in (Level.RED, Level.YELLOW):
        if level in levels:
            return level
    return Level.GREEN
