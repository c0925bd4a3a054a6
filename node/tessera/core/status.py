"""The one place where domain errors become gRPC status codes with rich details."""

from __future__ import annotations

import logging
import math

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tessera.core import errors

log = logging.getLogger(__name__)
DOMAIN = "tessera.dev"

_CODES: list[tuple[type[errors.TesseraError], int]] = [
    (errors.InvalidArgument, code_pb2.INVALID_ARGUMENT),
    (errors.NotFound, code_pb2.NOT_FOUND),
    (errors.PermissionDenied, code_pb2.PERMISSION_DENIED),
    (errors.Unauthenticated, code_pb2.UNAUTHENTICATED),
    (errors.FailedPrecondition, code_pb2.FAILED_PRECONDITION),
    (errors.OutOfRange, code_pb2.OUT_OF_RANGE),
    (errors.ResourceExhausted, code_pb2.RESOURCE_EXHAUSTED),
    (errors.Unimplemented, code_pb2.UNIMPLEMENTED),
    (errors.Unavailable, code_pb2.UNAVAILABLE),
]


def code_of(exc: errors.TesseraError) -> int:
    """The google.rpc code of a domain error."""
    if isinstance(exc, errors.Relayed):
        return exc.code
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return int(code)
    return int(code_pb2.INTERNAL)


def to_status(exc: errors.TesseraError) -> status_pb2.Status:
    """A google.rpc.Status with the details that help the caller act."""
    if isinstance(exc, errors.Relayed):
        relayed = status_pb2.Status.FromString(exc.status) if exc.status \
            else status_pb2.Status()
        relayed.code, relayed.message = exc.code, exc.message
        return relayed
    status = status_pb2.Status(code=code_of(exc), message=exc.message)
    if isinstance(exc, errors.FailedPrecondition) and exc.violations:
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in exc.violations]))
    if isinstance(exc, errors.InvalidArgument):
        detail = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in exc.violations
            ]
        )
        status.details.add().Pack(detail)
    elif isinstance(exc, errors.ResourceExhausted):
        retry = duration_pb2.Duration()
        retry.FromNanoseconds(math.ceil(exc.retry_after_s * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=retry))
        status.details.add().Pack(
            error_details_pb2.QuotaFailure(
                violations=[error_details_pb2.QuotaFailure.Violation(
                    subject=exc.subject, description=exc.message)]
            )
        )
    else:
        status.details.add().Pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN))
    return status


def grpc_status(exc: errors.TesseraError) -> grpc.Status:
    """The grpc.Status to abort a call with."""
    status = rpc_status.to_status(to_status(exc))
    if isinstance(exc, errors.ResourceExhausted):
        # For clients that do not decode google.rpc details: seconds, rounded up to the ms.
        wait = f"{math.ceil(exc.retry_after_s * 1000) / 1000:.3f}"
        status = status._replace(
            trailing_metadata=(*status.trailing_metadata, ("retry-after", wait)))
    return status


def internal_status(request_id: str) -> grpc.Status:
    """A generic INTERNAL status: no exception text, only the id to find it in the log."""
    status = status_pb2.Status(
        code=code_pb2.INTERNAL, message=f"internal error; request id {request_id}"
    )
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN))
    return rpc_status.to_status(status)


def status_code_of(exc: errors.TesseraError) -> grpc.StatusCode:
    """The grpc.StatusCode of a domain error."""
    code = code_of(exc)
    for sc in grpc.StatusCode:
        if sc.value[0] == code:
            return sc
    return grpc.StatusCode.INTERNAL
