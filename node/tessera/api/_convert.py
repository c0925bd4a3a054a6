"""Protobuf <-> domain conversions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from tessera.pki import IdentityKind, SpiffeId
from tessera.store import Operation, Resource
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
    msg = resources_pb2.Resource(
        workspace=r.workspace, kind=r.kind, id=r.id, title=r.title, body=r.body,
        attributes=dict_to_struct(r.attributes), embedding=r.embedding or [],
        owner=r.owner, team=r.team, version=r.version, etag=r.etag, source=source,
    )
    if r.created_at is not None:
        msg.create_time.FromDatetime(r.created_at)
    if r.updated_at is not None:
        msg.update_time.FromDatetime(r.updated_at)
    return msg


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


def operation_to_pb(op: Operation) -> command_pb2.Operation:
    """Domain operation to protobuf."""
    msg = command_pb2.Operation(
        name=op.name, command_type=op.command_type, done=True,
        state=command_pb2.OPERATION_STATE_SUCCEEDED if op.state == "SUCCEEDED"
        else command_pb2.OPERATION_STATE_FAILED,
        idempotency_key=op.idempotency_key, caller=op.caller,
        event_sequence=op.event_sequence or 0,
    )
    msg.result.not_found = op.not_found
    if op.result is not None:
        msg.result.resource.CopyFrom(resource_to_pb(op.result))
    msg.create_time.FromDatetime(op.created_at)
    msg.update_time.FromDatetime(op.updated_at)
    return msg
