"""Commands to peers: a local caller's Execute with `target`, and its relayed operation.

Trust model (docs/security.md, "Commands to peers"):

- Only local identities (client, admin) may set `target`; the servicer refuses a peer
  before calling anything here, so a node is never a relay for a third party.
- The peer sees this node's identity and applies the grant it gave this node; it knows
  nothing of the local caller. So every local caller gets its own remote operation: the
  remote idempotency key is SHA-256 over a domain tag, the caller's identity, a zero byte
  and the caller's key. Two callers with one key never share a remote operation, and a
  caller's retry finds its own again.
- The local row (state FORWARDED) belongs to the caller like any operation; Get, Watch and
  Cancel look it up by (name, caller) first, so another local caller gets NOT_FOUND and
  never reaches the peer. The peer's operation name is never accepted from a caller.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from tessera import audit
from tessera.api._runtime import Runtime
from tessera.api._validate import IDEMPOTENCY_RE, Checker
from tessera.calls import Caller
from tessera.core.errors import (
    PermissionDenied,
    ResourceExhausted,
    TesseraError,
    Unavailable,
)
from tessera.core.pagination import query_hash
from tessera.store import Operation, operation_uuid
from tessera_client.pb import command_pb2

#: Domain separation of remote idempotency keys (versioned: a change makes new keys).
KEY_DOMAIN = b"tessera/forwarded-command/v1\x00"
#: Audit records of forwarding (besides each call's own record).
AUDIT_SERVICE = "tessera.forward"
_MAX_TARGET = 128
#: Relayed WatchOperation streams one local caller may hold open at once (per process):
#: each is a stream on this node's one channel to the peer, shared by every caller.
MAX_FORWARDED_WATCHES = 16
#: Command types whose argument names another operation (of the caller, on the node that
#: runs them). Forwarded, the peer would resolve it against this node's identity, which
#: owns every local caller's remote operations, so they are not forwarded: a forwarded
#: run is read and cancelled through its local name instead.
_BY_OPERATION_NAME = frozenset({"agent.status", "agent.kill"})
_TYPES = {"put_resource": "resource.put", "delete_resource": "resource.delete",
          "batch_put_resources": "resource.batch_put"}


def remote_key(caller: str, key: str) -> str:
    """The idempotency key this node uses on the peer for `caller`'s `key`."""
    return hashlib.sha256(KEY_DOMAIN + caller.encode() + b"\x00" + key.encode()).hexdigest()


class _Record:
    """A forwarding audit record, committed with the local row's change."""

    def __init__(self, entry: audit.AuditEntry, writer: audit.AuditWriter) -> None:
        self._entry = entry
        self._writer = writer
        self.is_committed = False

    def payload(self) -> bytes:
        return audit.payload(self._entry)

    def committed(self) -> None:
        self.is_committed = True
        self._writer.link_soon()


class Forwarder:
    """Executes commands on peers for local callers and relays their operations."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        #: Relayed watches open now, per local caller (see MAX_FORWARDED_WATCHES).
        self._watching: dict[str, int] = {}

    def _record(self, caller: Caller, what: str, op: Operation, remote: str,
                reason: str = "FORWARDED") -> _Record | None:
        """A `tessera.forward` record: FORWARDING when a command is about to be sent (its
        remote operation unknown yet), FORWARDED once the peer named its operation."""
        if self.rt.auditor is None:
            return None
        detail = {"target": op.forward_peer, "operation": op.name,
                  "remote_idempotency_key": remote_key(caller.uri, op.idempotency_key)}
        if remote:
            detail["remote_operation"] = remote
        return _Record(audit.AuditEntry(
            time=dt.datetime.now(dt.UTC), identity=caller.uri, peer="", grant="",
            service=AUDIT_SERVICE, method=what, kind=op.command_type[:128], query_hash="",
            outcome=audit.Outcome.ALLOWED.value, status_code="OK", bytes_out=0,
            latency_us=0, trace_id="", reason=reason, detail=detail),
            self.rt.auditor)

    async def execute(self, caller: Caller,
                      request: command_pb2.ExecuteRequest) -> command_pb2.Operation:
        """Execute `request` on its target peer; the local (relayed) operation."""
        if not caller.is_local:  # the servicer refused peers already; never rely on it
            raise PermissionDenied("only local identities may execute a command on a peer",
                                   reason="FORWARD_NOT_ALLOWED")
        c = Checker()
        c.pattern("idempotency_key", request.idempotency_key, IDEMPOTENCY_RE,
                  "1-128 printable ASCII characters without spaces")
        c.max_len("target", request.target, _MAX_TARGET)
        which = request.WhichOneof("command")
        if which is None:
            c.fail("command", "one of put_resource, delete_resource, batch_put_resources or "
                              "plugin is required")
        elif which == "plugin" and not request.plugin.type:
            c.fail("plugin.type", "is required")
        elif which == "plugin" and request.plugin.type in _BY_OPERATION_NAME:
            # The peer would check the named operation against this node, which owns every
            # local caller's remote operations: one tool could reach another's run.
            c.fail("plugin.type", f"{request.plugin.type} names the peer's operation and "
                                  "cannot be forwarded; use GetOperation / CancelOperation "
                                  "of the run's name on this node")
        c.done()
        target = request.target
        # The peer checks the command itself (type, grant, schema): this node may not
        # even have the handler. Here: the peer is joined, and the key is the caller's.
        bare = command_pb2.ExecuteRequest()
        bare.CopyFrom(request)
        bare.ClearField("idempotency_key")
        command_type = request.plugin.type if which == "plugin" else _TYPES[str(which)]
        request_hash = query_hash({"forward": bare.SerializeToString(deterministic=True).hex()})
        # Before anything is stored: a peer not joined, or one whose circuit is open (the
        # call would send nothing), leaves no reservation behind.
        self.rt.federation.sendable(target)
        # The attempt is audited with the reservation, before anything is sent: the peer
        # may accept a command whose answer never comes back (or refuse it), and its audit
        # names only this node; this record ties the remote key to the local caller.
        op = await self.rt.operations.create_forward(
            caller=caller.uri, idempotency_key=request.idempotency_key,
            command_type=command_type, request_hash=request_hash, peer=target,
            audit=lambda row: self._record(caller, "Execute", row, "", reason="FORWARDING"))
        if op.forward_operation:
            # A retry of an accepted request: the peer's operation as it is now.
            return await self._get(op)
        outgoing = command_pb2.ExecuteRequest()
        outgoing.CopyFrom(request)
        outgoing.ClearField("target")
        outgoing.idempotency_key = remote_key(caller.uri, request.idempotency_key)
        try:
            remote = await self.rt.federation.command(target, "Execute", outgoing)
        except Unavailable:
            # The peer may have accepted it: keep the reservation; the caller's retry
            # (same key, so the same remote key) finds the peer's operation.
            raise
        except TesseraError:
            await self.rt.operations.drop_forward(op.name)
            raise
        if not remote.name.startswith("operations/") or len(remote.name) > 100 \
                or operation_uuid(remote.name) is None:
            raise Unavailable(f"peer {target} answered an operation name this node cannot "
                              "use; execute again with the same idempotency key",
                              reason="PEER_FAILED")
        stored = await self.rt.operations.forwarded(
            op.name, remote.name, self._record(caller, "Execute", op, remote.name))
        if stored is None:
            raise Unavailable("the operation changed while it was forwarded; execute again "
                              "with the same idempotency key", reason="FORWARD_CONFLICT")
        return await self._relayed(stored, remote)

    async def _relayed(self, op: Operation,
                       remote: command_pb2.Operation) -> command_pb2.Operation:
        """The peer's operation as the local caller sees it: under the local name, key and
        caller, with `target`; state, progress, output and error as the peer gave them."""
        msg = command_pb2.Operation()
        msg.CopyFrom(remote)
        msg.name, msg.idempotency_key, msg.caller = op.name, op.idempotency_key, op.caller
        msg.target = op.forward_peer
        if msg.done and op.forward_operation and op.finished_at is None:
            await self.rt.operations.touch_forward(op.name, done=True)  # retention starts
        return msg

    def _remote_name(self, op: Operation) -> str:
        if not op.forward_operation:
            raise Unavailable(f"peer {op.forward_peer} has not confirmed {op.name} yet; "
                              "execute it again with the same idempotency key",
                              reason="FORWARD_UNCONFIRMED")
        return op.forward_operation

    async def _get(self, op: Operation) -> command_pb2.Operation:
        remote = await self.rt.federation.command(
            op.forward_peer, "GetOperation",
            command_pb2.GetOperationRequest(name=self._remote_name(op)))
        return await self._relayed(op, remote)

    async def get(self, op: Operation) -> command_pb2.Operation:
        """GetOperation of the caller's forwarded operation (looked up by the caller)."""
        return await self._get(op)

    async def cancel(self, caller: Caller, op: Operation) -> command_pb2.Operation:
        """CancelOperation on the peer; audited here with the caller, peer and remote name."""
        name = self._remote_name(op)
        # Recorded before it leaves: B may cancel and its answer never come back.
        await self.rt.operations.touch_forward(
            op.name, done=False,
            audit=self._record(caller, "CancelOperation", op, name, reason="FORWARDING"))
        remote = await self.rt.federation.command(
            op.forward_peer, "CancelOperation", command_pb2.CancelOperationRequest(name=name))
        await self.rt.operations.touch_forward(
            op.name, done=remote.done, audit=self._record(caller, "CancelOperation", op, name))
        return await self._relayed(op, remote)

    async def watch(self, caller: Caller,
                    op: Operation) -> AsyncIterator[command_pb2.Operation]:
        """WatchOperation on the peer, each message relayed (output chunks included), up
        to the first done one: a watch ends there, whatever the peer sends after it (a
        peer that kept streaming would hold this node's and the caller's stream open)."""
        remote_name = self._remote_name(op)
        held = self._watching.get(caller.uri, 0)
        if held >= MAX_FORWARDED_WATCHES:
            # One caller must not fill the channel to the peer that all callers share.
            raise ResourceExhausted(
                f"this caller already watches {held} operations on peers through this "
                "node, the most allowed; close one first", retry_after_s=1.0,
                subject=caller.uri)
        self._watching[caller.uri] = held + 1
        try:
            stream: AsyncGenerator[Any, None] = self.rt.federation.command_stream(
                op.forward_peer, "WatchOperation",
                command_pb2.WatchOperationRequest(name=remote_name))
            async with contextlib.aclosing(stream):  # ends the peer's stream at once
                async for remote in stream:
                    relayed = await self._relayed(op, remote)
                    yield relayed
                    if relayed.done:
                        return
        finally:
            left = self._watching.pop(caller.uri, 1) - 1
            if left > 0:
                self._watching[caller.uri] = left
