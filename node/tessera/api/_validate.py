"""Request validation: collect every field violation, then raise one InvalidArgument."""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from tessera.core.errors import FieldViolation, InvalidArgument

WORKSPACE_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
KIND_RE = re.compile(r"^[a-z0-9._-]{1,64}$")
ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")
IDEMPOTENCY_RE = re.compile(r"^[\x21-\x7e]{1,128}$")
MAX_TITLE = 1000
MAX_BODY = 1 << 20
MAX_ATTRIBUTES = 64 << 10
MAX_NAME = 200
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


class Checker:
    """Accumulates violations; `done()` raises them all at once."""

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def fail(self, field: str, description: str) -> None:
        """Record one violation."""
        self.violations.append(FieldViolation(field, description))

    def done(self) -> None:
        """Raise InvalidArgument if anything was recorded."""
        if self.violations:
            raise InvalidArgument(self.violations)

    def pattern(self, field: str, value: str, regex: re.Pattern[str], what: str,
                *, required: bool = True) -> None:
        """Check a string against a pattern (empty allowed unless required)."""
        if not value:
            if required:
                self.fail(field, "is required")
            return
        if not regex.match(value):
            self.fail(field, f"must be {what}")

    def kind(self, field: str, value: str, known: Collection[str], *,
             required: bool = True) -> None:
        """A kind name that this node knows."""
        self.pattern(field, value, KIND_RE, "1-64 characters of [a-z0-9._-]", required=required)
        if value and KIND_RE.match(value) and value not in known:
            self.fail(field, f"unknown kind {value!r}; this node knows {', '.join(sorted(known))}")

    def max_len(self, field: str, value: str | bytes, limit: int) -> None:
        """A length limit."""
        if len(value) > limit:
            self.fail(field, f"must be at most {limit} characters long, got {len(value)}")

    def embedding(self, field: str, values: Sequence[float], dimension: int, *,
                  required: bool = False) -> None:
        """Empty (unless required) or exactly `dimension` finite numbers."""
        if not values:
            if required:
                self.fail(field, f"is required ({dimension} numbers)")
            return
        if len(values) != dimension:
            self.fail(field, f"must have exactly {dimension} values, got {len(values)}")
        elif not all(math.isfinite(v) for v in values):
            self.fail(field, "must contain only finite numbers (no NaN or infinity)")

    def timestamp(self, field: str, value: Timestamp, present: bool) -> datetime | None:
        """A Timestamp the caller set, as an aware datetime; None when absent or invalid."""
        if not present:
            return None
        try:
            return value.ToDatetime(tzinfo=UTC)
        except (ValueError, OverflowError):
            self.fail(field, "is not a valid timestamp (years 1 to 9999, nanos 0-999999999)")
            return None

    def duration(self, field: str, value: Duration) -> timedelta | None:
        """A Duration as a timedelta; None when it is out of range."""
        try:
            return value.ToTimedelta()
        except (ValueError, OverflowError):
            self.fail(field, "is not a valid duration")
            return None

    def page_size(self, field: str, value: int) -> int:
        """0 means the default; 1..MAX_PAGE_SIZE allowed."""
        if value < 0 or value > MAX_PAGE_SIZE:
            self.fail(field, f"must be between 0 and {MAX_PAGE_SIZE}, got {value}")
            return DEFAULT_PAGE_SIZE
        return value or DEFAULT_PAGE_SIZE
