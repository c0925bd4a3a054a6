"""CommandService: built-in resource commands with idempotency keys."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from tessera.api._convert import operation_to_pb, resource_from_pb
from tessera.api._query import check_key
from tessera.api._runtime import Runtime
from tessera.api._validate import (
    IDEMPOTENCY_RE,
    MAX_ATTRIBUTES,
    MAX_BODY,
    MAX_NAME,
    MAX_TITLE,
    Checker,
)
from tessera.calls import current_caller, peer_scope
from tessera.core.errors import FailedPrecondition, FieldViolation, InvalidArgument, Unimplemented
from tessera.core.pagination import PageTokenError, query_hash
from tessera.grants import DELETE, PUT
from tessera.store import ResourceKey, version_of_etag
from tessera_client.pb import command_pb2, command_pb2_grpc


def _check_etag(c: Checker, field: str, etag: str) -> int | None:
    if not etag:
        return None
    version = version_of_etag(etag)
    if version is None:
        c.fail(field, "is not an etag this node issued (expected the value of Resource.etag)")
    return version


def _check_operation_name(name: str) -> None:
    if not name:
        raise InvalidArgument([FieldViolation("name", "is required")])
    if not name.startswith("operations/") or len(name) > 100:
        raise InvalidArgument([FieldViolation("name", "must look like operations/<uuid>")])


class CommandServicer(command_pb2_grpc.CommandServiceServicer):
    """Executes typed commands."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def Execute(
        self, request: command_pb2.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> command_pb2.Operation:
        c = Checker()
        c.pattern("idempotency_key", request.idempotency_key, IDEMPOTENCY_RE,
                  "1-128 printable ASCII characters without spaces")
        which = request.WhichOneof("command")
        caller = current_caller().uri
        # Peers write only what their grant names: command type first, then the key's
        # kind and workspace, then (in the store) the existing row's team and owner.
        scope = peer_scope(current_caller())
        predicate = scope.predicate() if scope else None
        if which is None:
            c.fail("command", "one of put_resource, delete_resource or plugin is required")
            c.done()
        if which == "plugin":
            if scope is not None:
                scope.check_command(request.plugin.type)
            c.done()
            raise Unimplemented(
                f"no handler is registered for plugin command type {request.plugin.type!r}"
            )
        if which == "put_resource":
            cmd = request.put_resource
            if not cmd.HasField("resource"):
                c.fail("put_resource.resource", "is required")
                c.done()
            r = cmd.resource
            if scope is not None:
                scope.check_command(PUT)
                scope.check_write(workspace=r.workspace, kind=r.kind, team=r.team,
                                  owner=r.owner)
            check_key(c, "put_resource.resource", r.workspace, r.kind, r.id, self.rt.kinds)
            c.max_len("put_resource.resource.title", r.title, MAX_TITLE)
            c.max_len("put_resource.resource.body", r.body.encode(), MAX_BODY)
            c.max_len("put_resource.resource.owner", r.owner, MAX_NAME)
            c.max_len("put_resource.resource.team", r.team, MAX_NAME)
            c.max_len("put_resource.resource.attributes", r.attributes.SerializeToString(),
                      MAX_ATTRIBUTES)
            c.embedding("put_resource.resource.embedding", r.embedding,
                        self.rt.cfg.store.embedding_dimension)
            expected = _check_etag(c, "put_resource.expected_etag", cmd.expected_etag)
            if cmd.create_only and expected is not None:
                c.fail("put_resource.create_only", "cannot be combined with expected_etag")
            c.done()
            op = await self.rt.store.execute_put(
                caller=caller, idempotency_key=request.idempotency_key,
                resource=resource_from_pb(r), expected_version=expected,
                create_only=cmd.create_only, scope=predicate,
            )
            return operation_to_pb(op)
        cmd_d = request.delete_resource
        if scope is not None:
            scope.check_command(DELETE)
            scope.check_read(workspace=cmd_d.key.workspace, kind=cmd_d.key.kind)
        if not cmd_d.HasField("key"):
            c.fail("delete_resource.key", "is required")
        else:
            k = cmd_d.key
            check_key(c, "delete_resource.key", k.workspace, k.kind, k.id, self.rt.kinds)
        expected = _check_etag(c, "delete_resource.expected_etag", cmd_d.expected_etag)
        c.done()
        k = cmd_d.key
        op = await self.rt.store.execute_delete(
            caller=caller, idempotency_key=request.idempotency_key,
            key=ResourceKey(k.workspace, k.kind, k.id), expected_version=expected,
            allow_missing=cmd_d.allow_missing, scope=predicate,
        )
        return operation_to_pb(op)

    async def GetOperation(
        self, request: command_pb2.GetOperationRequest, context: grpc.aio.ServicerContext
    ) -> command_pb2.Operation:
        _check_operation_name(request.name)
        op = await self.rt.store.get_operation(request.name, current_caller().uri)
        return operation_to_pb(op)

    async def ListOperations(
        self, request: command_pb2.ListOperationsRequest, context: grpc.aio.ServicerContext
    ) -> command_pb2.ListOperationsResponse:
        c = Checker()
        page_size = c.page_size("page_size", request.page_size)
        if request.state not in (command_pb2.OPERATION_STATE_UNSPECIFIED,
                                 command_pb2.OPERATION_STATE_SUCCEEDED):
            # Built-in commands finish inside Execute, so no other state is ever stored.
            c.done()
            return command_pb2.ListOperationsResponse()
        c.done()
        caller = current_caller().uri
        qhash = query_hash({"list_operations": True})
        after: list[Any] | None = None
        if request.page_token:
            try:
                after = self.rt.tokens.decode(request.page_token, query=qhash, caller=caller)
            except PageTokenError as exc:
                raise InvalidArgument([FieldViolation("page_token", str(exc))]) from None
        ops = await self.rt.store.list_operations(caller, limit=page_size + 1, after=after)
        token = ""
        if len(ops) > page_size:
            ops = ops[:page_size]
            last = ops[-1]
            token = self.rt.tokens.encode(
                query=qhash, caller=caller,
                position=[last.created_at.isoformat(), last.name.removeprefix("operations/")],
            )
        return command_pb2.ListOperationsResponse(
            operations=[operation_to_pb(o) for o in ops], next_page_token=token
        )

    async def CancelOperation(
        self, request: command_pb2.CancelOperationRequest, context: grpc.aio.ServicerContext
    ) -> command_pb2.Operation:
        _check_operation_name(request.name)
        await self.rt.store.get_operation(request.name, current_caller().uri)
        raise FailedPrecondition(
            f"operation {request.name} is already done and cannot be cancelled",
            reason="OPERATION_DONE",
        )

    async def WatchOperation(
        self, request: command_pb2.WatchOperationRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[command_pb2.Operation]:
        _check_operation_name(request.name)
        # Built-in commands are done when Execute returns, so the stream ends at once.
        op = await self.rt.store.get_operation(request.name, current_caller().uri)
        yield operation_to_pb(op)

