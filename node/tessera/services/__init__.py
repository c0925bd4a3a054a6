"""gRPC servicers: thin adapters between protobuf and the node's service layer."""

from tessera.services._admin import AdminServicer, run_checks
from tessera.services._command import CommandServicer
from tessera.services._events import EventServicer
from tessera.services._query import QueryServicer

__all__ = ["AdminServicer", "CommandServicer", "EventServicer", "QueryServicer", "run_checks"]
