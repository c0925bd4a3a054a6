"""Request validation: collect every field violation, then raise one InvalidArgument."""

from __future__ import annotations

import math
import re
import sys
from array import array
from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
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
        elif not all_finite(values):
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


#: The longest string any request field may hold (characters); fields have tighter limits
#: in their methods' checks.
MAX_STRING = 1 << 20
#: Violations reported per request at most (a fuzzer's request can have thousands).
_MAX_VIOLATIONS = 20
_FLOAT_TYPES = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)


def all_finite(values: Iterable[float]) -> bool:
    """No NaN or infinity among `values` (an embedding: hundreds of numbers per call).

    A NaN or an infinity makes the sum non-finite, so a finite sum (one C-level pass)
    proves every value finite; only a non-finite sum, which finite doubles can also
    reach by overflowing, needs the element-wise check.
    """
    return math.isfinite(sum(values)) or all(math.isfinite(v) for v in values)


def float32s(message: Message, name: str) -> array[float]:
    """A `repeated float` field's values as `array('f')`, copied by the C runtime.

    Iterating the field makes one Python float per value (≈ 6 µs for 384, and `list()` of
    it ≈ 7 µs); copying it into a message of its own and serialising that costs ≈ 1 µs, and
    the packed values are then the last 4 bytes per value of those bytes. A finite sum of
    float32 values proves each one finite (no sum of fewer than 10^270 of them overflows a
    double), so `math.isfinite(sum(...))` is then an exact check.
    """
    values = getattr(message, name)
    fd = message.DESCRIPTOR.fields_by_name[name]
    out = array("f")
    if not values:
        return out
    if fd.type != FieldDescriptor.TYPE_FLOAT:
        # array('f') would round doubles to float32 silently (1e300 to inf).
        raise TypeError(f"{message.DESCRIPTOR.full_name}.{name} is not a float field")
    if not fd.is_packed:
        out.extend(values)
        return out
    scratch = type(message)()
    getattr(scratch, name).MergeFrom(values)
    data = scratch.SerializeToString()
    out.frombytes(memoryview(data)[len(data) - 4 * len(values):])
    if sys.byteorder == "big":
        out.byteswap()
    return out


def check_message(message: Message, wire: bytes | None = None) -> None:
    """The checks every request gets, whatever its method: raise InvalidArgument naming
    each field that holds a string PostgreSQL cannot store (a NUL character) or too long,
    or a number that is not finite (NaN, infinity), anywhere in the message, including
    inside google.protobuf.Struct/Value attributes and filters.

    With the message's `wire` bytes, most requests skip the walk: without a 0x00 byte no
    string holds a NUL (U+0000 is encoded as that byte), no string is longer than the
    whole message, and a type with no floating-point field anywhere has no number to check.
    """
    if (wire is not None and len(wire) <= MAX_STRING and b"\x00" not in wire
            and not _has_numbers(message.DESCRIPTOR)):
        return
    out: list[FieldViolation] = []
    _walk(message, "", out)
    if out:
        raise InvalidArgument(out[:_MAX_VIOLATIONS])


_NUMBERS: dict[str, bool] = {}
_NUMBER_TYPES = frozenset({"google.protobuf.Value", "google.protobuf.Struct",
                           "google.protobuf.ListValue"})


def _has_numbers(desc: Any) -> bool:
    """Whether messages of this type can hold a floating-point number anywhere (cached)."""
    found = _NUMBERS.get(desc.full_name)
    if found is None:
        _NUMBERS[desc.full_name] = False  # a recursive type does not loop
        found = desc.full_name in _NUMBER_TYPES or any(
            fd.type in _FLOAT_TYPES
            or (fd.message_type is not None and _has_numbers(fd.message_type))
            for fd in desc.fields)
        _NUMBERS[desc.full_name] = found
    return found


def _name(text: str) -> str:
    """A caller-chosen map key as it can appear in a field path."""
    return text.replace("\x00", "\\x00") if "\x00" in text else text


def _join(prefix: str, part: str) -> str:
    return f"{prefix}.{part}" if prefix else part


def _string(field: str, value: str, out: list[FieldViolation]) -> None:
    if "\x00" in value:
        out.append(FieldViolation(field, "must not contain a NUL character"))
    elif len(value) > MAX_STRING:
        out.append(FieldViolation(field, f"must be at most {MAX_STRING} characters long"))


def _number(field: str, value: float, out: list[FieldViolation]) -> None:
    if not math.isfinite(value):
        out.append(FieldViolation(field, "must be a finite number (not NaN or infinity)"))


def _walk(message: Message, prefix: str, out: list[FieldViolation]) -> None:
    if len(out) >= _MAX_VIOLATIONS:
        return
    full_name = message.DESCRIPTOR.full_name
    if full_name == "google.protobuf.Struct":
        for key, value in message.fields.items():  # type: ignore[attr-defined]
            field = _join(prefix, _name(key))
            _string(f"{field} (key)", key, out)
            _walk(value, field, out)
        return
    if full_name == "google.protobuf.Value":
        kind = message.WhichOneof("kind")
        if kind == "number_value":
            _number(prefix, message.number_value, out)  # type: ignore[attr-defined]
        elif kind == "string_value":
            _string(prefix, message.string_value, out)  # type: ignore[attr-defined]
        elif kind in ("struct_value", "list_value"):
            _walk(getattr(message, kind), prefix, out)
        return
    if full_name == "google.protobuf.ListValue":
        for i, item in enumerate(message.values):  # type: ignore[attr-defined]
            _walk(item, f"{prefix}[{i}]", out)
        return
    for fd, value in message.ListFields():
        field = _join(prefix, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            value_fd = fd.message_type.fields_by_name["value"]
            for key, item in value.items():
                item_field = f"{field}[{_name(str(key))}]"
                if isinstance(key, str):
                    _string(f"{item_field} (key)", key, out)
                _one(value_fd, item, item_field, out)
        elif fd.is_repeated:
            if fd.type in _FLOAT_TYPES:
                # One violation for a vector, not one per element.
                if not _finite_numbers(message, fd, value):
                    _number(field, math.nan, out)
                continue
            for i, item in enumerate(value):
                _one(fd, item, f"{field}[{i}]", out)
        else:
            _one(fd, value, field, out)


def _finite_numbers(message: Message, fd: FieldDescriptor, values: Iterable[float]) -> bool:
    """Whether a repeated float or double field holds finite numbers only (a float field
    read as `array('f')`: no Python float per value, see `float32s`)."""
    if fd.type == FieldDescriptor.TYPE_FLOAT:
        return math.isfinite(sum(float32s(message, fd.name)))
    return all_finite(values)


def _one(fd: FieldDescriptor, value: object, field: str, out: list[FieldViolation]) -> None:
    if fd.type == FieldDescriptor.TYPE_STRING:
        _string(field, value, out)  # type: ignore[arg-type]
    elif fd.type in _FLOAT_TYPES:
        _number(field, value, out)  # type: ignore[arg-type]
    elif fd.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP):
        _walk(value, field, out)  # type: ignore[arg-type]
