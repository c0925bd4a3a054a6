"""Unit tests of tessera.observability: logs."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator

import pytest

from tessera.observability import (
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
