"""The node's exception hierarchy: one root, a subclass per category, structured fields.

Domain code raises these; `tessera.core.status` maps them to gRPC status codes in
exactly one place. Messages must never carry a credential, key or DSN password.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class TesseraError(Exception):
    """Root of every error the node raises on purpose."""

    #: Stable machine-readable reason, used as `google.rpc.ErrorInfo.reason`.
    reason: str = "TESSERA_ERROR"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field of a request."""

    field: str
    description: str


class InvalidArgument(TesseraError):
    """The request is malformed; `violations` name the fields."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        self.violations = list(violations)
        text = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(f"invalid request: {text}")


class NotFound(TesseraError):
    """The named thing does not exist (or the caller may not know it exists)."""

    reason = "NOT_FOUND"


class PermissionDenied(TesseraError):
    """The caller is known but not allowed; `reason` is stable and audited."""

    reason = "PERMISSION_DENIED"


class Unauthenticated(TesseraError):
    """The caller could not be identified."""

    reason = "UNAUTHENTICATED"


class FailedPrecondition(TesseraError):
    """The system is not in a state that allows the call (version mismatch, reused key).

    `violations`, when given, name the request fields the state refuses (a BadRequest
    detail besides the ErrorInfo), e.g. a `target` peer that has not been joined.
    """

    reason = "FAILED_PRECONDITION"

    def __init__(self, message: str, *, reason: str | None = None,
                 violations: Sequence[FieldViolation] = ()) -> None:
        super().__init__(message, reason=reason)
        self.violations = list(violations)


class Relayed(TesseraError):
    """A peer's refusal passed on as it came: its google.rpc code, and its serialized
    google.rpc.Status (message and details such as BadRequest or ErrorInfo)."""

    def __init__(self, code: int, message: str, status: bytes, *, reason: str) -> None:
        super().__init__(message, reason=reason)
        self.code = code
        self.status = status


class OutOfRange(TesseraError):
    """A position the caller named is past what exists (an event cursor beyond retention)."""

    reason = "OUT_OF_RANGE"


class ResourceExhausted(TesseraError):
    """A rate limit or quota was hit; `retry_after_s` says how long to wait."""

    reason = "RATE_LIMITED"

    def __init__(self, message: str, *, retry_after_s: float, subject: str = "") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.subject = subject


class Unimplemented(TesseraError):
    """The RPC is defined in the API but not built yet."""

    reason = "UNIMPLEMENTED"


class Unavailable(TesseraError):
    """A dependency (database, peer, CA) is unreachable; the call may be retried."""

    reason = "UNAVAILABLE"


class AddressInUse(TesseraError):
    """A port the node should listen on is taken by another process (not a wrong setting)."""

    reason = "ADDRESS_IN_USE"


class ConfigError(TesseraError):
    """The configuration is wrong; the message names the setting and the fix."""

    reason = "CONFIG_ERROR"


def exit_with(exc: TesseraError) -> int:
    """For a command line: say what went wrong on stderr, give the exit status (a
    configuration error 2, anything else 1)."""
    import sys

    if isinstance(exc, ConfigError):
        print(f"tessera: configuration error: {exc.message}", file=sys.stderr)
        return 2
    print(f"tessera: {exc.message}", file=sys.stderr)
    return 1
