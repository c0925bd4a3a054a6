"""CommandService: built-in resource commands, plugin commands and their operations."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from tessera.api._convert import (
    command_type_to_pb,
    operation_to_pb,
    resource_from_pb,
    snapshot_to_pb,
    struct_to_dict,
)
from tessera.api._forward import Forwarder
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
from tessera.commands import Admission
from tessera.core.errors import FieldViolation, InvalidArgument, PermissionDenied
from tessera.core.pagination import PageTokenError, query_hash
from tessera.grants import DELETE, PUT, Scope
from tessera.store import Resource, ResourceKey, version_of_etag
from tessera_client.pb import command_pb2, command_pb2_grpc

_MAX_BATCH = 100
_STATES = {
    command_pb2.OPERATION_STATE_PENDING: "PENDING",
    command_pb2.OPERATION_STATE_RUNNING: "RUNNING",
    command_pb2.OPERATION_STATE_SUCCEEDED: "SUCCEEDED",
    command_pb2.OPERATION_STATE_FAILED: "FAILED",
    command_pb2.OPERATION_STATE_CANCELLED: "CANCELLED",
}


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
    """Executes commands: built-ins at once, registered handlers through the runner."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.forwarder = Forwarder(rt)

    def _check_put(self, c: Checker, field: str, cmd: command_pb2.PutResourceCommand,
                   scope: Scope | None) -> tuple[Resource, int | None, bool] | None:
        """Validate one put; (resource, expected version, create only) or None if invalid."""
        if not cmd.HasField("resource"):
            c.fail(f"{field}.resource", "is required")
            return None
        r = cmd.resource
        if scope is not None:
            scope.check_write(workspace=r.workspace, kind=r.kind, team=r.team, owner=r.owner)
        before = len(c.violations)
        check_key(c, f"{field}.resource", r.workspace, r.kind, r.id, self.rt.kinds)
        c.max_len(f"{field}.resource.title", r.title, MAX_TITLE)
        c.max_len(f"{field}.resource.body", r.body.encode(), MAX_BODY)
        c.max_len(f"{field}.resource.owner", r.owner, MAX_NAME)
        c.max_len(f"{field}.resource.team", r.team, MAX_NAME)
        c.max_len(f"{field}.resource.attributes", r.attributes.SerializeToString(),
                  MAX_ATTRIBUTES)
        c.embedding(f"{field}.resource.embedding", r.embedding,
                    self.rt.cfg.store.embedding_dimension)
        expected = _check_etag(c, f"{field}.expected_etag", cmd.expected_etag)
        if cmd.create_only and expected is not None:
            c.fail(f"{field}.create_only", "cannot be combined with expected_etag")
        if len(c.violations) > before:
            return None
        return resource_from_pb(r), expected, cmd.create_only

    async def Execute(
        self, request: command_pb2.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> command_pb2.Operation:
        if request.target:
            # First, before anything is read or stored: only a local tool may have this
            # node act on a peer; a peer asking for it is refused (no onward relay).
            who = current_caller()
            if not who.is_local:
                raise PermissionDenied(
                    "a peer may not have this node execute a command on another node "
                    "(ExecuteRequest.target is for local callers)",
                    reason="FORWARD_NOT_ALLOWED")
            return await self.forwarder.execute(who, request)
        c = Checker()
        c.pattern("idempotency_key", request.idempotency_key, IDEMPOTENCY_RE,
                  "1-128 printable ASCII characters without spaces")
        which = request.WhichOneof("command")
        caller = current_caller().uri
        key = request.idempotency_key
        # Peers write only what their grant names: command type first, then the key's
        # kind and workspace, then (in the store) the existing row's team and owner.
        scope = peer_scope(current_caller())
        predicate = scope.predicate() if scope else None
        ops = self.rt.operations
        if which is None:
            c.fail("command", "one of put_resource, delete_resource, batch_put_resources or "
                              "plugin is required")
            c.done()
        if which == "plugin":
            return await self._execute_plugin(c, request.plugin, caller, key, scope)
        if which == "put_resource":
            if scope is not None:
                scope.check_command(PUT)
            put = self._check_put(c, "put_resource", request.put_resource, scope)
            c.done()
            assert put is not None
            op = await ops.execute_put(
                caller=caller, idempotency_key=key, resource=put[0], expected_version=put[1],
                create_only=put[2], scope=predicate,
            )
            return operation_to_pb(op)
        if which == "batch_put_resources":
            if scope is not None:
                scope.check_command(PUT)
            items = request.batch_put_resources.puts
            if not 1 <= len(items) <= _MAX_BATCH:
                c.fail("batch_put_resources.puts", f"must hold 1-{_MAX_BATCH} puts")
            puts = [self._check_put(c, f"batch_put_resources.puts[{i}]", p, scope)
                    for i, p in enumerate(items[:_MAX_BATCH])]
            keys = [(p[0].workspace, p[0].kind, p[0].id) for p in puts if p is not None]
            if len(set(keys)) != len(keys):
                c.fail("batch_put_resources.puts", "names one resource more than once")
            c.done()
            op = await ops.execute_batch_put(
                caller=caller, idempotency_key=key, puts=[p for p in puts if p is not None],
                scope=predicate)
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
        op = await ops.execute_delete(
            caller=caller, idempotency_key=key,
            key=ResourceKey(k.workspace, k.kind, k.id), expected_version=expected,
            allow_missing=cmd_d.allow_missing, scope=predicate,
        )
        return operation_to_pb(op)

    async def _execute_plugin(self, c: Checker, cmd: command_pb2.PluginCommand, caller: str,
                              key: str, scope: Scope | None) -> command_pb2.Operation:
        reg = self.rt.commands.get(cmd.type) if cmd.type else None
        if scope is not None:
            try:
                scope.check_command(cmd.type)
            except PermissionDenied:
                if reg is None or not reg.handler.granted_with:
                    raise
                scope.check_command(reg.handler.granted_with)
        if not cmd.type:
            c.fail("plugin.type", "is required")
        elif reg is None:
            known = ", ".join(r.handler.type for r in self.rt.commands.all()
                              if r.handler.long_running) or "none"
            c.fail("plugin.type", f"no handler is registered for command type {cmd.type!r} "
                                  f"on this node (plugin types: {known})")
        elif not reg.handler.long_running:
            c.fail("plugin.type", f"{cmd.type} is a built-in; use its typed field of "
                                  "ExecuteRequest")
        c.done()
        assert reg is not None
        args = struct_to_dict(cmd.args)
        self.rt.commands.validate(cmd.type, args)
        stored = args
        request_hash = query_hash({"plugin": cmd.type, "args": args})
        async with contextlib.AsyncExitStack() as admitting:
            if reg.handler.admit is not None:
                # Admission counts what is active, then the insert adds to it: one step
                # for every node process on this store, or concurrent calls all pass.
                await admitting.enter_async_context(
                    self.rt.operations.exclusive(f"tessera.admit:{cmd.type}"))
            # A retry of a stored operation gets it back; only a new one is admitted (a
            # retry must not be refused because its own run fills the cap).
            if reg.handler.admit is not None \
                    and await self.rt.operations.by_key(caller, key, request_hash) is None:
                grant = current_caller().grant
                admitted = await reg.handler.admit(Admission(
                    command_type=cmd.type, caller=caller, args=args,
                    grant=grant.name if grant is not None else ""))
                stored = {**args, "_admission": dict(admitted)}
            op, created = await self.rt.operations.create_pending(
                caller=caller, idempotency_key=key, command_type=cmd.type,
                request_hash=request_hash, input=stored,
                retry_safe=reg.handler.retry_safe,
            )
        if created:
            await self.rt.runner.submit(op)
        return operation_to_pb(op)

    async def GetOperation(
        self, request: command_pb2.GetOperationRequest, context: grpc.aio.ServicerContext
    ) -> command_pb2.Operation:
        _check_operation_name(request.name)
        op = await self.rt.operations.get(request.name, current_caller().uri)
        if op.forward_peer:
            return await self.forwarder.get(op)
        return operation_to_pb(op)

    async def ListOperations(
        self, request: command_pb2.ListOperationsRequest, context: grpc.aio.ServicerContext
    ) -> command_pb2.ListOperationsResponse:
        c = Checker()
        page_size = c.page_size("page_size", request.page_size)
        state = ""
        if request.state != command_pb2.OPERATION_STATE_UNSPECIFIED:
            if request.state not in _STATES:
                c.fail("state", "is not an OperationState")
            else:
                state = _STATES[request.state]
        if request.command_type and self.rt.commands.get(request.command_type) is None:
            c.fail("command_type", f"unknown command type {request.command_type!r}")
        c.done()
        caller = current_caller().uri
        qhash = query_hash({"list_operations": True, "state": state,
                            "command_type": request.command_type})
        after: list[Any] | None = None
        if request.page_token:
            try:
                after = self.rt.tokens.decode(request.page_token, query=qhash, caller=caller)
            except PageTokenError as exc:
                raise InvalidArgument([FieldViolation("page_token", str(exc))]) from None
        ops = await self.rt.operations.list(caller, limit=page_size + 1, after=after,
                                            state=state, command_type=request.command_type)
        token = ""
        if len(ops) > page_size:
            ops = ops[:page_size]
            last = ops[-1]
            token = self.rt.tokens.encode(
                query=qhash, caller=caller,
                position=[last.created_at.isoformat(), last.uuid],
            )
        return command_pb2.ListOperationsResponse(
            operations=[operation_to_pb(o) for o in ops], next_page_token=token
        )

    async def CancelOperation(
        self, request: command_pb2.CancelOperationRequest, context: grpc.aio.ServicerContext
    ) -> command_pb2.Operation:
        _check_operation_name(request.name)
        caller = current_caller()
        # The caller's own operation or NOT_FOUND, before anything is forwarded.
        mine = await self.rt.operations.get(request.name, caller.uri)
        if mine.forward_peer:
            return await self.forwarder.cancel(caller, mine)
        op = await self.rt.operations.request_cancel(request.name, caller.uri)
        return operation_to_pb(op)

    async def ListCommandTypes(
        self, request: command_pb2.ListCommandTypesRequest, context: grpc.aio.ServicerContext
    ) -> command_pb2.ListCommandTypesResponse:
        return command_pb2.ListCommandTypesResponse(
            command_types=[command_type_to_pb(r) for r in self.rt.commands.all()])

    async def WatchOperation(
        self, request: command_pb2.WatchOperationRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[command_pb2.Operation]:
        """The current state, then one message per recorded change, until done.

        Changes are read from the operation's events (appended in the transaction of each
        change), so none is skipped however fast they come; NOTIFY only wakes the reader.
        """
        _check_operation_name(request.name)
        caller = current_caller().uri
        ops = self.rt.operations
        mine = await ops.get(request.name, caller)  # the caller's own, or NOT_FOUND
        if mine.forward_peer:
            async for relayed in self.forwarder.watch(current_caller(), mine):
                yield relayed
            return
        async with self.rt.runner.watch(request.name) as changed:
            after = await ops.last_change(request.name)
            op = await ops.get(request.name, caller)
            last = operation_to_pb(op)
            yield last
            if op.done:
                return
            while True:
                changed.clear()
                changes = await ops.changes(request.name, after)
                for sequence, event_type, data in changes:
                    after = sequence
                    if event_type == "operation.output":
                        chunk = command_pb2.Operation()
                        chunk.CopyFrom(last)
                        chunk.output_chunk = str(data.get("text", ""))
                        yield chunk
                        continue
                    if data.get("state") in ("SUCCEEDED", "FAILED", "CANCELLED"):
                        yield operation_to_pb(await ops.get(request.name, caller))
                        return
                    msg = snapshot_to_pb(last, data)
                    if msg != last:
                        last = msg
                        yield msg
                if op.done:
                    # Seen done in the row, and no event says so: its events were pruned.
                    yield operation_to_pb(op)
                    return
                if not changes and not await _wait(changed,
                                                   self.rt.cfg.operations.sweep_interval_s):
                    # No word for a while (a lost notification?): check the row; the next
                    # pass reads any events it has before trusting it.
                    op = await ops.get(request.name, caller)


async def _wait(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait for `event` up to `timeout_s`; whether it was set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout_s)
    return event.is_set()
