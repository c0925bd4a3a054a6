"""Property: no request, however malformed, makes any RPC answer UNKNOWN or INTERNAL, or
leaves the node unwell.

Messages are generated from each method's request descriptor: random valid and invalid
field values, NUL characters, NaN and infinities injected into strings and numbers
(Struct/Value included), out-of-range timestamps, unknown enum values; and random bytes
that are no message at all. CI runs a bounded number of examples; `make fuzz` runs many
more (TESSERA_FUZZ_EXAMPLES).
"""

from __future__ import annotations

import math
import os
from typing import Any

import grpc
from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera_client import Client
from tessera_client.pb import admin_pb2, command_pb2, events_pb2, query_pb2
from tests.fixtures.nodes import NodeFactory

EXAMPLES = int(os.environ.get("TESSERA_FUZZ_EXAMPLES", "250"))
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.DEADLINE_EXCEEDED}
SERVICES = [query_pb2.DESCRIPTOR.services_by_name["QueryService"],
            command_pb2.DESCRIPTOR.services_by_name["CommandService"],
            events_pb2.DESCRIPTOR.services_by_name["EventService"],
            admin_pb2.DESCRIPTOR.services_by_name["AdminService"]]
#: (path, request descriptor, server-streaming) of every method.
METHODS = [(f"/{s.full_name}/{m.name}", m.input_type, m.server_streaming)
           for s in SERVICES for m in s.methods]

_NASTY_TEXT = ["", "\x00", "a\x00b", "acme", "task", "note", "t1", "local", "all",
               "operations/x", "grants/00000000-0000-0000-0000-000000000000",
               "\ud7ff\ue000", "é" * 300, "x" * 5000, "v1", "v99999999999999999999"]
_NASTY_FLOAT = [math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, 5e-324, 0.5]
texts = st.one_of(st.sampled_from(_NASTY_TEXT), st.text(max_size=40),
                  st.text(max_size=8).map(lambda t: t + "\x00"))
floats = st.one_of(st.sampled_from(_NASTY_FLOAT), st.floats())
_I32, _U32 = (-(2**31), 2**31 - 1), (0, 2**32 - 1)
_I64, _U64 = (-(2**63), 2**63 - 1), (0, 2**64 - 1)
_T = FieldDescriptor
_INT_RANGES = {
    _T.TYPE_INT32: _I32, _T.TYPE_SINT32: _I32, _T.TYPE_SFIXED32: _I32, _T.TYPE_ENUM: _I32,
    _T.TYPE_UINT32: _U32, _T.TYPE_FIXED32: _U32, _T.TYPE_INT64: _I64, _T.TYPE_SINT64: _I64,
    _T.TYPE_SFIXED64: _I64, _T.TYPE_UINT64: _U64, _T.TYPE_FIXED64: _U64,
}


def _int(fd: FieldDescriptor) -> st.SearchStrategy[int]:
    lo, hi = _INT_RANGES[fd.type]
    small = st.integers(-3, 1100).filter(lambda v: lo <= v <= hi)
    edges = st.sampled_from([lo, hi, 0, 1])
    if fd.type == FieldDescriptor.TYPE_ENUM:
        small = st.sampled_from([v.number for v in fd.enum_type.values] + [99, -1])
    return st.one_of(small, edges, st.integers(lo, hi))


_leaves = st.one_of(st.none(), st.booleans(), floats, texts)
#: JSON-like values for google.protobuf.Value, two levels deep at most.
values: st.SearchStrategy[Any] = st.one_of(
    _leaves,
    st.lists(_leaves, max_size=3),
    st.dictionaries(texts, st.one_of(_leaves, st.lists(_leaves, max_size=2)), max_size=3),
)


def _set_value(target: struct_pb2.Value, v: Any) -> None:
    if v is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif isinstance(v, bool):
        target.bool_value = v
    elif isinstance(v, float):
        target.number_value = v
    elif isinstance(v, str):
        target.string_value = v
    elif isinstance(v, list):
        target.list_value.SetInParent()
        for item in v:
            _set_value(target.list_value.values.add(), item)
    else:
        target.struct_value.SetInParent()
        for k, item in v.items():
            _set_value(target.struct_value.fields[k], item)


def _scalar(data: st.DataObject, fd: FieldDescriptor) -> Any:
    if fd.type == FieldDescriptor.TYPE_STRING:
        return data.draw(texts)
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return data.draw(st.binary(max_size=40))
    if fd.type == FieldDescriptor.TYPE_BOOL:
        return data.draw(st.booleans())
    if fd.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        v = data.draw(floats)
        if fd.type == FieldDescriptor.TYPE_FLOAT and math.isfinite(v) and abs(v) > 3e38:
            v = math.copysign(math.inf, v)
        return v
    return data.draw(_int(fd))


def fill(data: st.DataObject, msg: Message, depth: int = 0) -> None:
    """Set a random subset of `msg`'s fields to random, often hostile, values."""
    desc = msg.DESCRIPTOR
    if desc.full_name == "google.protobuf.Struct":
        for k, v in data.draw(st.dictionaries(texts, values, max_size=3)).items():
            _set_value(msg.fields[k], v)  # type: ignore[attr-defined]
        return
    if desc.full_name == "google.protobuf.Value":
        _set_value(msg, data.draw(values))  # type: ignore[arg-type]
        return
    for fd in desc.fields:
        if not data.draw(st.booleans()):
            continue
        is_msg = fd.type == FieldDescriptor.TYPE_MESSAGE
        entry = fd.message_type
        if is_msg and entry is not None and entry.GetOptions().map_entry:
            key_fd = entry.fields_by_name["key"]
            val_fd = entry.fields_by_name["value"]
            target = getattr(msg, fd.name)
            for _ in range(data.draw(st.integers(0, 2))):
                k = _scalar(data, key_fd)
                if val_fd.type == FieldDescriptor.TYPE_MESSAGE:
                    if depth < 3:
                        fill(data, target[k], depth + 1)
                else:
                    target[k] = _scalar(data, val_fd)
        elif fd.is_repeated:
            field = getattr(msg, fd.name)
            size = data.draw(st.sampled_from([0, 1, 2, 4]))
            for _ in range(size):
                if is_msg:
                    if depth < 3:
                        fill(data, field.add(), depth + 1)
                else:
                    field.append(_scalar(data, fd))
        elif is_msg:
            if depth < 3:
                sub = getattr(msg, fd.name)
                sub.SetInParent()
                fill(data, sub, depth + 1)
        else:
            setattr(msg, fd.name, _scalar(data, fd))


#: A valid Subscribe or Watch streams until its client leaves: wait this long for its
#: first message or its error; a stream still open then was accepted.
STREAM_WAIT_S = 2.0


def _call(channel: grpc.Channel, path: str, streaming: bool, body: bytes) -> grpc.StatusCode:
    try:
        if streaming:
            call = channel.unary_stream(path)(body, timeout=STREAM_WAIT_S)
            try:
                next(iter(call))
            except StopIteration:
                return grpc.StatusCode.OK
            call.cancel()
        else:
            channel.unary_unary(path)(body, timeout=30)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        if streaming and code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return grpc.StatusCode.OK  # open and waiting for events: a live stream
        return code
    return grpc.StatusCode.OK


def test_no_request_makes_any_rpc_answer_unknown_or_internal(node_factory: NodeFactory) -> None:
    node = node_factory()
    clients = {who: Client(node.address, node.credentials(who)) for who in ("client", "admin")}
    seen: dict[grpc.StatusCode, int] = {}
    try:
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(data=st.data(), method=st.sampled_from(METHODS),
               who=st.sampled_from(["client", "client", "admin"]), raw=st.booleans())
        def one(data: st.DataObject, method: tuple[str, Descriptor, bool], who: str,
                raw: bool) -> None:
            path, desc, streaming = method
            if path.startswith("/tessera.v1.AdminService/") and who == "client":
                who = "admin"  # mostly reach the handlers, not only the denial
            if raw:
                body = data.draw(st.binary(max_size=64))
            else:
                msg = GetMessageClass(desc)()
                fill(data, msg)
                body = msg.SerializeToString()
            code = _call(clients[who].channel, path, streaming, body)
            seen[code] = seen.get(code, 0) + 1
            assert code not in FORBIDDEN, (path, body[:200])

        one()
        # The node is alive and well after all that.
        assert node.proc is not None and node.proc.poll() is None
        clients["client"].query.Describe(query_pb2.DescribeRequest(), timeout=30)
        verdict = clients["admin"].admin.VerifyAudit(admin_pb2.VerifyAuditRequest(), timeout=30)
        assert verdict.ok, verdict.message
        assert grpc.StatusCode.INVALID_ARGUMENT in seen
    finally:
        for c in clients.values():
            c.close()
