"""Logs: plain text for a terminal, or one JSON object per line for a log pipeline.

Structured fields travel in `extra=log_fields(...)`; the JSON formatter writes them as
top-level keys, and adds the trace id of the current span to every line written inside a
traced call. Every line, in both formats, passes a redaction filter that masks URL
passwords and `password=` / `token=` values, so a DSN or URL that reaches a message does
not leak its credential.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any, TextIO

from opentelemetry.trace import get_current_span

from tessera.core.redact import redact_secrets as redact

FORMATS = ("text", "json")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


def log_fields(**fields: str | int | float | bool | None) -> dict[str, Any]:
    """`extra=` for a log call whose fields the JSON format writes as keys."""
    return {"fields": fields}


class _Redact(logging.Filter):
    """Masks secrets in the formatted message (and its exception text) of every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, trace id and fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ctx = get_current_span().get_span_context()
        if ctx.is_valid:
            out["trace_id"] = format(ctx.trace_id, "032x")
            out["span_id"] = format(ctx.span_id, "016x")
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update({k: v for k, v in fields.items() if v is not None and v != ""})
        for key, value in vars(record).items():  # other extra= keys, as given
            if key not in _STANDARD and key != "fields" and key not in out:
                out[key] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_info:
            out["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False, default=str)


class _Text(logging.Formatter):
    def formatException(self, ei: Any) -> str:
        return redact(super().formatException(ei))


def configure_logging(fmt: str = "text", level: str | int = "INFO",
                      stream: TextIO | None = None, *, access: bool = True) -> None:
    """Send the root logger's records to `stream` (stderr) in `fmt` ('text' or 'json').

    `access=False` drops the one-line-per-call records of the `tessera.access` logger.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} must be one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else _Text(_TEXT))
    handler.addFilter(_Redact())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # Python's warnings go to stderr as text of their own: route them through the handler.
    logging.captureWarnings(fmt == "json")
    logging.getLogger("tessera.access").setLevel(logging.NOTSET if access else logging.WARNING)
