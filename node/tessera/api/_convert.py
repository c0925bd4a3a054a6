"""Protobuf <-> domain conversions."""

from __future__ import annotations

import struct
import sys
from array import array
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.rpc import error_details_pb2, status_pb2

from tessera.commands import Registered
from tessera.pki import IdentityKind, SpiffeId
from tessera.store import Operation, OperationError, Resource
from tessera_client.pb import command_pb2, resources_pb2

_KINDS = {
    IdentityKind.NODE: resources_pb2.Identity.KIND_NODE,
    IdentityKind.CLIENT: resources_pb2.Identity.KIND_CLIENT,
    IdentityKind.ADMIN: resources_pb2.Identity.KIND_ADMIN,
}


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp, or None."""
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a plain dict."""
    return json_format.MessageToDict(value)


def dict_to_struct(value: dict[str, Any]) -> struct_pb2.Struct:
    """A plain dict as a Struct."""
    out = struct_pb2.Struct()
    out.update(value)
    return out


def value_to_python(value: struct_pb2.Value) -> Any:
    """A Value as plain JSON data."""
    return json_format.MessageToDict(value)


def resource_to_pb(r: Resource, *, source: str = "local") -> resources_pb2.Resource:
    """Domain resource to protobuf."""
    msg = resources_pb2.Resource()
    fill_resource(msg, r, source=source)
    return msg


def fill_resource(msg: resources_pb2.Resource, r: Resource, *, source: str = "local") -> None:
    """Set an empty `msg` (e.g. a new `hits.add().resource`) to `r`, without a copy.

    This runs once per returned row, so it avoids protobuf's Python-level helpers: the
    attributes are encoded as Struct wire bytes and parsed by the C runtime, timestamps set
    as seconds and nanos.
    """
    msg.workspace = r.workspace
    msg.kind = r.kind
    msg.id = r.id
    msg.title = r.title
    msg.body = r.body
    msg.attributes.ParseFromString(struct_bytes(r.attributes))
    embedding = r.embedding
    if embedding:
        if isinstance(embedding, array) and embedding.typecode == "f":
            # As read from PostgreSQL: parsed as packed wire bytes by the C runtime, not
            # one float at a time.
            if sys.byteorder == "big":
                embedding = array("f", embedding)
                embedding.byteswap()
            data = embedding.tobytes()
            msg.MergeFromString(_EMBEDDING_TAG + _len(len(data)) + data)
        else:
            msg.embedding.extend(embedding)
    msg.owner = r.owner
    msg.team = r.team
    msg.version = r.version
    msg.etag = r.etag
    msg.source = source
    if r.created_at is not None:
        _set_time(msg.create_time, r.created_at)
    if r.updated_at is not None:
        _set_time(msg.update_time, r.updated_at)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAIVE_EPOCH = datetime(1970, 1, 1)


def _set_time(ts: timestamp_pb2.Timestamp, value: datetime) -> None:
    """`ts.FromDatetime(value)` (naive values are UTC), without its calendar arithmetic."""
    d = value - (_NAIVE_EPOCH if value.tzinfo is None else _EPOCH)
    ts.seconds = d.days * 86400 + d.seconds
    ts.nanos = d.microseconds * 1000


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _BYTE[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_BYTE = [bytes([i]) for i in range(0x80)]
#: The key of Resource.embedding as a packed (length-delimited) field.
_EMBEDDING_TAG = bytes([resources_pb2.Resource.EMBEDDING_FIELD_NUMBER << 3 | 2])
_DOUBLE_PACK = struct.Struct("<d").pack


def _len(n: int) -> bytes:
    """The varint of a length (one byte below 128, as nearly every length here is)."""
    return _BYTE[n] if n < 0x80 else _varint(n)


def _value_bytes(v: Any) -> bytes:
    """google.protobuf.Value wire bytes of a JSON value (as `Struct.update` would set it).

    Exact types first (what json.loads gives), so the common values take one comparison.
    """
    t = type(v)
    if t is str:
        data: bytes = v.encode()
        return b"\x1a" + _len(len(data)) + data  # string_value
    if t is float:
        return b"\x11" + _DOUBLE_PACK(v)  # number_value
    if t is int:
        return b"\x11" + _DOUBLE_PACK(float(v))  # OverflowError past a double's range
    if v is None:
        return b"\x08\x00"  # null_value = NULL_VALUE
    if v is True:
        return b"\x20\x01"  # bool_value
    if v is False:
        return b"\x20\x00"
    if isinstance(v, dict):
        data = struct_bytes(v)
        return b"\x2a" + _len(len(data)) + data  # struct_value
    if isinstance(v, list | tuple):
        parts = []
        for e in v:
            item = _value_bytes(e)
            parts.append(b"\x0a" + _len(len(item)) + item)
        data = b"".join(parts)
        return b"\x32" + _len(len(data)) + data  # list_value
    if isinstance(v, int | float):  # subclasses (bool was handled above)
        return b"\x11" + _DOUBLE_PACK(float(v))
    if isinstance(v, str):  # a subclass: its characters, whatever its __str__ says
        data = str.encode(v)
        return b"\x1a" + _len(len(data)) + data
    raise ValueError(f"unexpected type {type(v).__name__} in attributes")


def struct_bytes(value: dict[str, Any]) -> bytes:
    """google.protobuf.Struct wire bytes of a JSON object: `dict_to_struct(value)`'s bytes,
    up to the order of map entries."""
    out = []
    for k, v in value.items():
        key = k.encode()
        val = _value_bytes(v)
        entry = b"\x0a" + _len(len(key)) + key + b"\x12" + _len(len(val)) + val
        out.append(b"\x0a" + _len(len(entry)) + entry)
    return b"".join(out)


def resource_from_pb(msg: resources_pb2.Resource) -> Resource:
    """Protobuf resource (already validated) to domain; output-only fields dropped."""
    return Resource(
        workspace=msg.workspace, kind=msg.kind, id=msg.id, title=msg.title, body=msg.body,
        attributes=struct_to_dict(msg.attributes), embedding=list(msg.embedding) or None,
        owner=msg.owner, team=msg.team,
    )


def identity_to_pb(identity: SpiffeId) -> resources_pb2.Identity:
    """Domain identity to protobuf."""
    return resources_pb2.Identity(
        uri=identity.uri, trust_domain=identity.trust_domain, kind=_KINDS[identity.kind],
        name=identity.name,
    )


_STATE_PB = {
    "PENDING": command_pb2.OPERATION_STATE_PENDING,
    "RUNNING": command_pb2.OPERATION_STATE_RUNNING,
    "SUCCEEDED": command_pb2.OPERATION_STATE_SUCCEEDED,
    "FAILED": command_pb2.OPERATION_STATE_FAILED,
    "CANCELLED": command_pb2.OPERATION_STATE_CANCELLED,
}


def error_to_pb(error: OperationError) -> status_pb2.Status:
    """An operation's error as google.rpc.Status with ErrorInfo naming its reason."""
    status = status_pb2.Status(code=error.code, message=error.message)
    if error.reason:
        status.details.add().Pack(error_details_pb2.ErrorInfo(reason=error.reason,
                                                               domain="tessera"))
    return status


def operation_to_pb(op: Operation) -> command_pb2.Operation:
    """Domain operation to protobuf."""
    msg = command_pb2.Operation(
        name=op.name, command_type=op.command_type, done=op.done,
        state=_STATE_PB[op.state], idempotency_key=op.idempotency_key, caller=op.caller,
        event_sequence=op.event_sequence or 0,
        progress=command_pb2.OperationProgress(percent=op.progress_percent,
                                               message=op.progress_message),
        cancel_requested=op.cancel_requested, attempts=op.attempts,
    )
    if op.error is not None:
        msg.error.CopyFrom(error_to_pb(op.error))
    elif op.state == "SUCCEEDED":
        if op.output is not None:
            msg.output.CopyFrom(dict_to_struct(op.output))
        elif op.batch is not None:
            msg.batch_result.resources.extend(resource_to_pb(r) for r in op.batch)
        else:
            msg.result.not_found = op.not_found
            if op.result is not None:
                msg.result.resource.CopyFrom(resource_to_pb(op.result))
    msg.create_time.FromDatetime(op.created_at)
    msg.update_time.FromDatetime(op.updated_at)
    return msg


def snapshot_to_pb(base: command_pb2.Operation,
                   data: dict[str, Any]) -> command_pb2.Operation:
    """`base` with the state, progress and counters of an operation event's snapshot."""
    msg = command_pb2.Operation()
    msg.CopyFrom(base)
    msg.state = _STATE_PB.get(data.get("state", ""), base.state)
    msg.done = data.get("state") in ("SUCCEEDED", "FAILED", "CANCELLED")
    progress = data.get("progress") or {}
    msg.progress.percent = int(progress.get("percent", -1))
    msg.progress.message = str(progress.get("message", ""))
    msg.cancel_requested = bool(data.get("cancel_requested"))
    msg.attempts = int(data.get("attempts", base.attempts))
    if data.get("updated_at"):
        msg.update_time.FromDatetime(datetime.fromisoformat(data["updated_at"]))
    return msg


def command_type_to_pb(reg: Registered) -> command_pb2.CommandType:
    """A registered command type to protobuf."""
    h = reg.handler
    return command_pb2.CommandType(
        type=h.type, description=h.description, input_schema=dict_to_struct(
            dict(h.input_schema)), source=reg.source, timeout_seconds=h.timeout_s,
        retry_safe=h.retry_safe, cancel_hook=h.on_cancel is not None,
        long_running=h.long_running,
    )
