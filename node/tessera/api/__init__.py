"""The gRPC edge: the call path (identity, admission, limits, audit, error mapping) and
thin servicers between protobuf and the node's service layer."""

from tessera.api._admin import AdminServicer, run_checks
from tessera.api._callpath import CallPath
from tessera.api._command import CommandServicer
from tessera.api._drain import SHUTTING_DOWN, Drain
from tessera.api._enrolment import EnrolmentAuditor, start_enroll_listener
from tessera.api._events import EventServicer
from tessera.api._forward import MAX_FORWARDED_WATCHES, remote_key
from tessera.api._query import QueryServicer
from tessera.api._reload import RELOADED_FILE, Reloader, ReloadResult, saved_settings
from tessera.api._runtime import Endpoints, Runtime

__all__ = [
    "MAX_FORWARDED_WATCHES",
    "RELOADED_FILE",
    "SHUTTING_DOWN",
    "AdminServicer",
    "CallPath",
    "CommandServicer",
    "Drain",
    "Endpoints",
    "EnrolmentAuditor",
    "EventServicer",
    "QueryServicer",
    "ReloadResult",
    "Reloader",
    "Runtime",
    "remote_key",
    "run_checks",
    "saved_settings",
    "start_enroll_listener",
]
