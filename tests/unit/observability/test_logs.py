"""Unit tests of tessera.observability: logs."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from collections.abc import Iterator

import pytest

from tessera.observability import (
    access_line,
    configure_logging,
    log_fields,
)
from tessera.observability._logs import ACCESS_FLUSH_S
from tests.fixtures.waiting import wait_until_sync


@contextlib.contextmanager
def _capture(fmt: str, *, access: bool = True) -> Iterator[io.StringIO]:
    """Root logging into a buffer, restored afterwards."""
    root, access_logger = logging.getLogger(), logging.getLogger("tessera.access")
    saved = (list(root.handlers), root.level, access_logger.level)
    buffer = io.StringIO()
    configure_logging(fmt, "INFO", stream=buffer, access=access)
    try:
        yield buffer
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        access_logger.setLevel(saved[2])
        logging.captureWarnings(False)


@pytest.fixture
def captured_json() -> Iterator[io.StringIO]:
    """Root logging into a buffer as JSON."""
    with _capture("json") as buffer:
        yield buffer


def test_access_lines_can_be_turned_off_and_text_is_masked_too() -> None:
    with _capture("text", access=False) as buffer:
        logging.getLogger("tessera.access").info("call done")
        logging.getLogger("tessera.test").info("dsn postgresql://u:hunter22@db/x")
    assert "call done" not in buffer.getvalue()
    assert "postgresql://u:***@db/x" in buffer.getvalue() and "hunter22" not in \
        buffer.getvalue()
    with _capture("text") as buffer:
        logging.getLogger("tessera.access").info("call done")
        logging.getLogger().handlers[0].flush()
        assert "call done" in buffer.getvalue()


def test_access_lines_are_written_in_batches_in_order_and_soon() -> None:
    access, other = logging.getLogger("tessera.access"), logging.getLogger("tessera.test")
    with _capture("text") as buffer:
        access.info("call one")
        access.info("call two")
        assert buffer.getvalue() == ""  # gathered, not yet written
        other.info("something else")  # any other line writes the gathered ones first
        lines = buffer.getvalue().splitlines()
        assert [line.rsplit(": ", 1)[1] for line in lines] == \
            ["call one", "call two", "something else"]
        access.warning("slow call")  # a warning is never held back
        assert buffer.getvalue().endswith("slow call\n")
        access.info("call three")  # written by the flusher within ACCESS_FLUSH_S
        wait_until_sync(lambda: "call three" in buffer.getvalue(), timeout_s=5 * ACCESS_FLUSH_S,
                   what="the gathered access line to be written")
        access.info("call four")
    # closing the handler (a reload replacing it, or the end of the process) writes the rest
    assert buffer.getvalue().endswith("call four\n")


def test_json_lines_carry_fields_and_never_a_secret(captured_json: io.StringIO) -> None:
    log = logging.getLogger("tessera.test")
    log.info("call done", extra=log_fields(trace_id="ab" * 16, code="OK", duration_ms=1.5,
                                           empty=""))
    log.warning("store at %s unreachable", "postgresql://u:hunter22@db/x")
    try:
        raise RuntimeError("password=hunter22 rejected")
    except RuntimeError:
        log.exception("failed")
    lines = [json.loads(line) for line in captured_json.getvalue().splitlines()]
    assert len(lines) == 3
    first = lines[0]
    assert (first["message"], first["trace_id"], first["code"], first["duration_ms"]) == (
        "call done", "ab" * 16, "OK", 1.5)
    assert "empty" not in first and first["level"] == "INFO" and first["time"].endswith("Z")
    assert lines[1]["message"] == "store at postgresql://u:***@db/x unreachable"
    assert "RuntimeError" in lines[2]["exception"]
    assert "hunter22" not in captured_json.getvalue()


def test_replacing_the_handler_of_a_stream_closed_meanwhile_raises_nothing() -> None:
    """In-process CLI runs (tests) configure logging again after the old stream closed."""
    with _capture("text") as buffer:
        logging.getLogger("tessera.access").info("held back")
        buffer.close()
        configure_logging("text", "INFO", stream=io.StringIO())


_CREATED = 1_764_000_000.0456  # a time whose milliseconds (045) need their leading zero


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_an_access_line_written_directly_is_the_line_its_record_gives(
        fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    access = logging.getLogger("tessera.access")
    message = "tessera.v1.QueryService/GetResource OK 1.2 ms token=hunter22"
    fields = {"request_id": "00ff", "identity": "spiffe://t.test/local/a", "peer": "",
              "code": "OK", "duration_ms": 1.234, "audit_sequence": None}
    with _capture(fmt) as buffer:
        # The direct path: no record is made (makeRecord would fail the test).
        monkeypatch.setattr("time.time", lambda: _CREATED)
        with monkeypatch.context() as m:
            m.setattr(access, "makeRecord", _no_record)
            access_line(logging.INFO, message, fields)
        record = access.makeRecord(access.name, logging.INFO, __file__, 0, "%s", (message,),
                                   None, extra=log_fields(**fields))
        record.created, record.msecs = _CREATED, 45.0
        access.handle(record)
        logging.getLogger().handlers[0].flush()
    direct, through_logging = buffer.getvalue().splitlines()
    assert direct == through_logging
    assert "hunter22" not in direct and "token=***" in direct
    if fmt == "text":
        assert ",045 INFO tessera.access: tessera.v1.QueryService/GetResource OK" in direct
    else:
        line = json.loads(direct)
        assert line["time"].endswith(".045Z") and line["request_id"] == "00ff"
        assert "peer" not in line and "audit_sequence" not in line  # empty fields left out


class _Keep(logging.Handler):
    """Keeps the records it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_access_lines_go_through_logging_when_another_handler_listens() -> None:
    with _capture("text") as buffer:
        keep = _Keep()
        logging.getLogger().addHandler(keep)
        try:
            access_line(logging.INFO, "svc/M OK 1.0 ms", {"code": "OK"})
        finally:
            logging.getLogger().removeHandler(keep)
        logging.getLogger().handlers[0].flush()
    assert [r.getMessage() for r in keep.records] == ["svc/M OK 1.0 ms"]
    assert keep.records[0].fields == {"code": "OK"}  # type: ignore[attr-defined]
    assert "tessera.access: svc/M OK 1.0 ms" in buffer.getvalue()
    with _capture("text", access=False) as buffer:
        access_line(logging.INFO, "svc/M OK 1.0 ms", {})
        logging.getLogger().handlers[0].flush()
    assert buffer.getvalue() == ""


def test_access_lines_go_through_logging_whenever_anything_else_is_set_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What logging would do decides: a handler or propagate=False on a logger above the
    access logger, a formatter converter set to UTC, a record factory adding fields."""
    parent = logging.getLogger("tessera")
    with _capture("text") as buffer:
        keep = _Keep()
        parent.addHandler(keep)
        try:
            access_line(logging.INFO, "seen above", {})
        finally:
            parent.removeHandler(keep)
        with monkeypatch.context() as m:
            m.setattr(parent, "propagate", False)
            access_line(logging.INFO, "stopped above", {})
        logging.getLogger().handlers[0].flush()
    assert [r.getMessage() for r in keep.records] == ["seen above"]
    assert "seen above" in buffer.getvalue() and "stopped above" not in buffer.getvalue()

    # A local zone far from UTC, so a line in local time cannot pass for one in UTC.
    monkeypatch.setenv("TZ", "EST+5")
    time.tzset()
    try:
        monkeypatch.setattr(logging.Formatter, "converter", time.gmtime)
        with _capture("text") as buffer:
            monkeypatch.setattr("time.time", lambda: _CREATED)
            access_line(logging.INFO, "in utc", {})
            logging.getLogger().handlers[0].flush()
        utc = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(_CREATED))
        assert buffer.getvalue().startswith(f"{utc},045 INFO tessera.access: in utc")
    finally:
        monkeypatch.undo()
        time.tzset()

    factory = logging.getLogRecordFactory()

    def tagged(*args: object, **kwargs: object) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.replica = "r1"
        return record

    logging.setLogRecordFactory(tagged)
    try:
        with _capture("json") as buffer:
            access_line(logging.INFO, "tagged", {"code": "OK"})
            logging.getLogger().handlers[0].flush()
    finally:
        logging.setLogRecordFactory(factory)
    line = json.loads(buffer.getvalue())
    assert line["replica"] == "r1" and line["code"] == "OK"


def _no_record(*args: object, **kwargs: object) -> logging.LogRecord:
    raise AssertionError("the access line was expected without a LogRecord")
