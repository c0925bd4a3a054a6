"""Logs: plain text for a terminal, or one JSON object per line for a log pipeline.

Structured fields travel in `extra=log_fields(...)`; the JSON formatter writes them as
top-level keys, and adds the trace id of the current span to every line written inside a
traced call. Every line, in both formats, passes a redaction filter that masks URL
passwords and `password=` / `token=` values, so a DSN or URL that reaches a message does
not leak its credential.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, TextIO

from opentelemetry.trace import get_current_span

from tessera.core.redact import redact_secrets as redact

FORMATS = ("text", "json")
#: The logger of the one line per finished call.
ACCESS_LOGGER = "tessera.access"
#: Access lines wait at most this long before they are written, with all gathered since.
ACCESS_FLUSH_S = 0.1
#: ...or until this many are gathered.
_ACCESS_BATCH = 256
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


def log_fields(**fields: str | int | float | bool | None) -> dict[str, Any]:
    """`extra=` for a log call whose fields the JSON format writes as keys."""
    return {"fields": fields}


def access_line(level: int, message: str, fields: Mapping[str, Any]) -> None:
    """Log one access line: what `logging.getLogger(ACCESS_LOGGER).log(level, message,
    extra=log_fields(**fields))` writes, for less CPU when the node's own handler is the
    only one (a busy node writes one per call); through logging otherwise."""
    logger = _ACCESS
    if not logger.isEnabledFor(level):
        return
    handler = _installed
    if handler is not None and _only_listener(handler) \
            and logging.getLogRecordFactory() is logging.LogRecord \
            and handler.access(level, message, fields):
        return
    logger.handle(logger.makeRecord(logger.name, level, __file__, 0, "%s", (message,), None,
                                    extra={"fields": fields}))


def _only_listener(handler: logging.Handler) -> bool:
    """Whether a record of the access logger would reach `handler` alone, unfiltered on
    the way: no handler or filter on the access logger or any logger above it but the
    root, all of them propagating, and `handler` the root's only handler."""
    current: logging.Logger | None = _ACCESS
    while current is not None and current is not logging.root:
        if current.handlers or current.filters or not current.propagate:
            return False
        current = current.parent
    root = logging.root
    return current is root and not root.filters and root.handlers == [handler]


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
        fields = getattr(record, "fields", None)
        out = self._object(record.created, record.levelname, record.name, record.getMessage(),
                           fields if isinstance(fields, dict) else None)
        for key, value in vars(record).items():  # other extra= keys, as given
            if key not in _STANDARD and key != "fields" and key not in out:
                out[key] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_info:
            out["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False, default=str)

    def line(self, created: float, level: str, logger: str, message: str,
             fields: Mapping[str, Any]) -> str:
        """The line `format` writes for a record of these, with no exception or extra."""
        return json.dumps(self._object(created, level, logger, message, fields),
                          ensure_ascii=False, default=str)

    @staticmethod
    def _object(created: float, level: str, logger: str, message: str,
                fields: Mapping[str, Any] | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(created, dt.UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": level,
            "logger": logger,
            "message": message,
        }
        ctx = get_current_span().get_span_context()
        if ctx.is_valid:
            out["trace_id"] = format(ctx.trace_id, "032x")
            out["span_id"] = format(ctx.span_id, "016x")
        if fields:
            out.update({k: v for k, v in fields.items() if v is not None and v != ""})
        return out


class _Text(logging.Formatter):
    def formatException(self, ei: Any) -> str:
        return redact(super().formatException(ei))


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """One write per line, except for access lines below WARNING: those are gathered and
    written together every ACCESS_FLUSH_S (or once _ACCESS_BATCH are gathered, and always
    before any other line, so lines keep their order).

    A busy node then pays one write() for a batch of calls instead of one per call (about
    a tenth of a call's CPU when measured). A SIGKILL loses at most the last
    ACCESS_FLUSH_S of access lines; the audit log, not this, is the durable record of
    calls. Stopping normally writes them all (logging's shutdown flushes and closes).
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._stopping = threading.Event()
        self._flusher: threading.Thread | None = None
        #: (second, "YYYY-mm-dd HH:MM:SS") of the last text line's time.
        self._second: tuple[int, str] = (-1, "")

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        if record.name != ACCESS_LOGGER or record.levelno >= logging.WARNING:
            self._write_pending()
            super().emit(record)
            return
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._gathered(line)

    def access(self, level: int, message: str, fields: Mapping[str, Any]) -> bool:
        """Gather an access line below WARNING as `emit` would format its record, without
        building one (`LogRecord` costs more than the line). False: this handler's
        formatter is not one of ours, so the caller logs a record instead."""
        formatter = self.formatter
        if level >= logging.WARNING or level < self.level or self.filters != [_REDACT]:
            return False
        now = time.time()
        message = redact(message)
        if type(formatter) is _Text and formatter.datefmt is None and \
                formatter._fmt == _TEXT and formatter.default_time_format == _TIME_FORMAT \
                and formatter.default_msec_format == "%s,%03d" \
                and formatter.converter is time.localtime:
            second = int(now)
            cached = self._second
            if cached[0] != second:
                cached = self._second = (second, time.strftime(_TIME_FORMAT,
                                                               time.localtime(second)))
            line = (f"{cached[1]},{int((now - second) * 1000):03d} "
                    f"{logging.getLevelName(level)} {ACCESS_LOGGER}: {message}")
        elif type(formatter) is JsonFormatter:
            line = formatter.line(now, logging.getLevelName(level), ACCESS_LOGGER, message,
                                  fields)
        else:
            return False
        with self.lock:  # type: ignore[union-attr]
            self._gathered(line)
        return True

    def _gathered(self, line: str) -> None:  # called with self.lock held
        self._pending.append(line + self.terminator)
        if len(self._pending) >= _ACCESS_BATCH:
            self._write_pending()
        elif self._flusher is None and not self._stopping.is_set():
            self._flusher = threading.Thread(target=self._flush_every, daemon=True,
                                             name="tessera-log-flush")
            self._flusher.start()

    def _flush_every(self) -> None:
        while not self._stopping.wait(ACCESS_FLUSH_S):
            with self.lock:  # type: ignore[union-attr]
                self._write_pending()

    def _write_pending(self) -> None:
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed or gone: nowhere left to say so
            pass

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_pending()
        with contextlib.suppress(OSError, ValueError):  # a stream closed under us
            super().flush()

    def close(self) -> None:
        self._stopping.set()
        self.flush()
        super().close()


#: Every handler's redaction filter (one instance: `_Handler.access` checks it is the one).
_REDACT = _Redact()
_ACCESS = logging.getLogger(ACCESS_LOGGER)
#: The handler the last `configure_logging` installed.
_installed: _Handler | None = None
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def configure_logging(fmt: str = "text", level: str | int = "INFO",
                      stream: TextIO | None = None, *, access: bool = True) -> None:
    """Send the root logger's records to `stream` (stderr) in `fmt` ('text' or 'json').

    `access=False` drops the one-line-per-call records of the `tessera.access` logger.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} must be one of {', '.join(FORMATS)}")
    global _installed
    handler = _Handler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else _Text(_TEXT))
    handler.addFilter(_REDACT)
    root = logging.getLogger()
    # The new handler first: with none at all for a moment, another thread's warning
    # would go to logging's last-resort handler, which does not redact.
    olds = list(root.handlers)
    root.addHandler(handler)
    _installed = handler
    for old in olds:
        root.removeHandler(old)
        old.close()
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # Python's warnings go to stderr as text of their own: route them through the handler.
    logging.captureWarnings(fmt == "json")
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.NOTSET if access else logging.WARNING)
