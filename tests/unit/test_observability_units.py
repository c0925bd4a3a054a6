"""Pure parts of observability: sampling decisions, redaction, JSON lines, metric labels."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator

import grpc
import pytest
from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    TraceFlags,
    set_span_in_context,
)
from prometheus_client.openmetrics.exposition import generate_latest

from tessera import config
from tessera.core.errors import ConfigError
from tessera.core.redact import redact_secrets as redact
from tessera.observability import (
    Metrics,
    Tracing,
    configure_logging,
    grpc_code_label,
    log_fields,
    make_sampler,
    span,
    trace_metadata,
)

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C


def _remote(sampled: bool) -> Context:
    ctx = SpanContext(TRACE_ID, 0xB7AD6B7169203331, is_remote=True,
                      trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else 0))
    return set_span_in_context(NonRecordingSpan(ctx))


@pytest.mark.parametrize(("ratio", "trust", "parent_sampled", "expected"), [
    (0.0, False, True, False),   # a peer's sampled flag does not force sampling on
    (0.0, True, True, True),     # ... unless remote parents are trusted
    (1.0, False, False, True),   # untrusted: this node's ratio decides either way
    (1.0, True, False, False),   # trusted: a not-sampled parent is followed too
])
def test_a_remote_parent_decides_sampling_only_when_trusted(
        ratio: float, trust: bool, parent_sampled: bool, expected: bool) -> None:
    sampler = make_sampler(ratio, trust)
    result = sampler.should_sample(_remote(parent_sampled), TRACE_ID, "call")
    assert (result.decision is Decision.RECORD_AND_SAMPLE) is expected


def test_disabled_tracing_makes_no_spans_and_sends_no_headers() -> None:
    tracing = Tracing.disabled()
    assert not tracing.enabled

    async def handler(request: object, context: object) -> object:
        return request

    assert tracing.server_unary("svc/m", handler) is handler
    with span("store get") as current:
        assert current is None
    assert trace_metadata() == ()


def test_config_validates_tracing_and_log_settings() -> None:
    cfg = config.load(environ={"TESSERA_TRACING_ENDPOINT": "127.0.0.1:4317",
                               "TESSERA_TRACING_SAMPLE_RATIO": "0.25",
                               "TESSERA_LOG_FORMAT": "json"})
    assert (cfg.tracing.endpoint, cfg.tracing.sample_ratio, cfg.log.format) == (
        "127.0.0.1:4317", 0.25, "json")
    assert not cfg.tracing.trust_remote_parent
    for env, setting in ((("TESSERA_TRACING_SAMPLE_RATIO", "1.5"), "tracing.sample_ratio"),
                         (("TESSERA_TRACING_ENDPOINT", "collector"), "tracing.endpoint"),
                         (("TESSERA_LOG_FORMAT", "xml"), "log.format")):
        with pytest.raises(ConfigError, match=setting):
            config.load(environ=dict([env]))


@pytest.mark.parametrize(("text", "secret"), [
    ("connecting to postgresql://tessera:s3cr3t-pw@db:5432/tessera failed", "s3cr3t-pw"),
    ("dsn host=db user=t password=s3cr3t-pw dbname=x", "s3cr3t-pw"),
    ("redis://:s3cr3t-pw@valkey:6379/0 down", "s3cr3t-pw"),
    ("fetching https://ca/crl?token=s3cr3t-pw&x=1", "s3cr3t-pw"),
    ("provisioner password: 's3cr3t-pw'", "s3cr3t-pw"),
])
def test_redaction_masks_passwords_and_tokens(text: str, secret: str) -> None:
    cleaned = redact(text)
    assert secret not in cleaned and "***" in cleaned
    assert redact("nothing secret in spiffe://tessera.local/node/a") == \
        "nothing secret in spiffe://tessera.local/node/a"


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
    assert "call done" in buffer.getvalue()


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


def test_grpc_codes_are_labelled_as_go_servers_label_them() -> None:
    assert [grpc_code_label(c) for c in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED,
                                         grpc.StatusCode.INVALID_ARGUMENT,
                                         grpc.StatusCode.RESOURCE_EXHAUSTED)] == [
        "OK", "Canceled", "InvalidArgument", "ResourceExhausted"]


def test_rpc_exemplars_and_breaker_states_are_exported() -> None:
    metrics = Metrics()
    metrics.rpc_done("tessera.v1.QueryService", "Describe", grpc.StatusCode.NOT_FOUND, 0.002,
                     "cd" * 16)
    states = {"b": "open"}
    metrics.watch_breakers(lambda: states)
    metrics.watch_breakers(lambda: states)  # a restarted node re-attaches: no duplicate
    text = generate_latest(metrics.registry).decode()
    handled = next(ln for ln in text.splitlines()
                   if ln.startswith("grpc_server_handled_total{"))
    assert 'grpc_code="NotFound"' in handled and f'trace_id="{"cd" * 16}"' in handled
    assert 'tessera_federation_breaker_state{peer="b",state="open"} 1.0' in text
    assert 'tessera_federation_breaker_state{peer="b",state="closed"} 0.0' in text
