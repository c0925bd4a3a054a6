"""Unit tests of tessera.core: status."""

from __future__ import annotations

import grpc
from google.rpc import code_pb2, error_details_pb2

from tessera.core import errors
from tessera.core.status import status_code_of, to_status


def test_status_mapping_carries_the_details_that_help() -> None:
    st_ = to_status(errors.InvalidArgument([errors.FieldViolation("key.id", "is required")]))
    assert st_.code == code_pb2.INVALID_ARGUMENT
    br = error_details_pb2.BadRequest()
    assert st_.details[0].Unpack(br) and br.field_violations[0].field == "key.id"
    rl = to_status(errors.ResourceExhausted("slow down", retry_after_s=1.5, subject="g"))
    retry = error_details_pb2.RetryInfo()
    assert rl.details[0].Unpack(retry) and retry.retry_delay.ToNanoseconds() == 1_500_000_000
    denied = errors.PermissionDenied("no", reason="NO_GRANT")
    assert status_code_of(denied) == grpc.StatusCode.PERMISSION_DENIED
    info = error_details_pb2.ErrorInfo()
    assert to_status(denied).details[0].Unpack(info) and info.reason == "NO_GRANT"
