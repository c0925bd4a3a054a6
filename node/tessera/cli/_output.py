"""The one way CLI commands print results: `Printer` (human text or tables, or `--json`).

One JSON style for every command: protobuf field names as declared (snake_case), enum
values by name without their type's prefix (`ACTIVE`, not `PEER_STATE_ACTIVE`), times in
RFC 3339 (UTC, `Z`), every field printed even when it holds its default. A command builds
its result (a protobuf message, or a dict of JSON values) and hands it to the printer;
human output is either a table (`Printer.table`) or lines the command composes.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import re
import sys
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from google.protobuf import json_format, message
from google.protobuf.descriptor import FieldDescriptor

_WELL_KNOWN = "google.protobuf."


def _enum_prefix(desc: Any) -> str:
    """PeerState -> PEER_STATE_ (the prefix proto style puts on every value)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", str(desc.name)).upper() + "_"


def _strip_prefix(value: Any, prefix: str) -> Any:
    if isinstance(value, list):
        return [_strip_prefix(v, prefix) for v in value]
    return value.removeprefix(prefix) if isinstance(value, str) else value


def _strip_enums(value: Any, desc: Any) -> Any:
    """Enum values of `value` (MessageToDict of a `desc` message) without their prefix."""
    if not isinstance(value, dict) or str(desc.full_name).startswith(_WELL_KNOWN):
        return value
    for f in desc.fields:
        if f.name not in value:
            continue
        v = value[f.name]
        if f.type == FieldDescriptor.TYPE_ENUM:
            value[f.name] = _strip_prefix(v, _enum_prefix(f.enum_type))
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            sub = f.message_type
            if sub.GetOptions().map_entry:
                vf = sub.fields_by_name["value"]
                if vf.type == FieldDescriptor.TYPE_MESSAGE and isinstance(v, dict):
                    value[f.name] = {k: _strip_enums(x, vf.message_type) for k, x in v.items()}
            elif isinstance(v, list):
                value[f.name] = [_strip_enums(x, sub) for x in v]
            else:
                value[f.name] = _strip_enums(v, sub)
    return value


def to_json(msg: message.Message) -> Any:
    """A protobuf message as JSON values, in the CLI's one style."""
    raw = json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True)
    return _strip_enums(raw, msg.DESCRIPTOR)


def enum_name(enum_type: Any, number: int) -> str:
    """An enum value's name without its prefix: enum_name(PeerState, 1) == 'ACTIVE'."""
    desc = enum_type.DESCRIPTOR
    return str(desc.values_by_number[number].name).removeprefix(_enum_prefix(desc))


def rfc3339(t: dt.datetime) -> str:
    """A time as RFC 3339 in UTC with a Z (naive times are taken as UTC)."""
    t = t if t.tzinfo else t.replace(tzinfo=dt.UTC)
    return t.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


_UNITS = (("year", 365 * 86400), ("month", 30 * 86400), ("day", 86400), ("hour", 3600),
          ("minute", 60), ("second", 1))


def human_delta(seconds: float) -> str:
    """A duration for people, in its largest whole unit: '29 days', '3 hours', '1 minute'."""
    seconds = abs(seconds)
    for unit, size in _UNITS:
        if seconds >= size or unit == "second":
            n = int(seconds // size)
            return f"{n} {unit}{'' if n == 1 else 's'}"
    raise AssertionError("unreachable")


def human_when(t: Any, now: dt.datetime | None = None) -> str:
    """'in 29 days' or '3 hours ago' for a datetime or protobuf Timestamp ('' if unset)."""
    if t is None:
        return ""
    if hasattr(t, "ToDatetime"):
        if not (t.seconds or t.nanos):
            return ""
        t = t.ToDatetime(tzinfo=dt.UTC)
    t = t if t.tzinfo else t.replace(tzinfo=dt.UTC)
    delta = (t - (now or dt.datetime.now(dt.UTC))).total_seconds()
    if abs(delta) < 1:
        return "now"
    return f"in {human_delta(delta)}" if delta > 0 else f"{human_delta(delta)} ago"


def _default(value: Any) -> Any:
    if isinstance(value, message.Message):
        return to_json(value)
    if isinstance(value, dt.datetime):
        return rfc3339(value)
    if isinstance(value, dt.timedelta):
        return f"{value.total_seconds():g}s"
    if isinstance(value, enum.Enum):
        return value.value
    if hasattr(value, "__fspath__"):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def dumps(value: Any, *, compact: bool = False) -> str:
    """JSON text of a message or JSON-able value, in the one style."""
    if isinstance(value, message.Message):
        value = to_json(value)
    if compact:
        return json.dumps(value, default=_default, separators=(",", ":"))
    return json.dumps(value, default=_default, indent=2)


@dataclass(frozen=True)
class Column:
    """A column of a human table: its header, the row key, and how a cell is shown."""

    header: str
    key: str
    width: int = 0
    align: str = "<"
    show: Callable[[Any], str] = str


def printable(text: str) -> str:
    """`text` for a terminal: control and format characters (escape sequences, bell,
    carriage return, bidi overrides) shown escaped, newlines and tabs kept. For words the
    node relays from elsewhere (a peer's refusal or error) that must not redraw the
    operator's screen."""
    if text.isprintable():
        return text
    return "".join(ch if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cf")
                   else ch.encode("unicode_escape").decode("ascii") for ch in text)


class Printer:
    """Prints a command's results: JSON when the command runs with --json, else text."""

    def __init__(self, *, json_output: bool = False, out: TextIO | None = None,
                 err: TextIO | None = None) -> None:
        self.json = json_output
        self._out = out
        self._err = err

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    @property
    def err(self) -> TextIO:
        return self._err or sys.stderr

    def line(self, text: str = "", *, flush: bool = False) -> None:
        """A line of human output (stdout)."""
        print(text, file=self.out, flush=flush)

    def warn(self, text: str) -> None:
        """A line for the operator on stderr (progress, warnings, refusals); control
        characters escaped (see `printable`)."""
        print(printable(text), file=self.err)

    def data(self, value: Any, *, compact: bool = False, flush: bool = False) -> None:
        """JSON of a message or JSON-able value, whatever --json says (for scripts)."""
        print(dumps(value, compact=compact), file=self.out, flush=flush)

    def result(self, value: Any, human: Callable[[], None] | None = None) -> None:
        """With --json (or no human form) the value as JSON, else `human()` prints it."""
        if self.json or human is None:
            self.data(value)
        else:
            human()

    def table(self, rows: Iterable[Mapping[str, Any]], columns: Sequence[Column]) -> None:
        """Rows as an aligned table with a header line (human output)."""
        cells = [[c.show(r.get(c.key, "")) for c in columns] for r in rows]
        widths = [max([c.width, len(c.header), *(len(row[i]) for row in cells)])
                  for i, c in enumerate(columns)]

        def fmt(values: Sequence[str]) -> str:
            parts = [f"{v:{c.align}{w}}" for v, c, w in zip(values, columns, widths, strict=True)]
            return " ".join(parts).rstrip()

        self.line(fmt([c.header for c in columns]))
        for row in cells:
            self.line(fmt(row))
