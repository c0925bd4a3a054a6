"""Commands to peers, pure parts: the remote idempotency key and relayed error statuses."""

from __future__ import annotations

import hashlib

from google.rpc import code_pb2, error_details_pb2, status_pb2

from tessera.api import remote_key
from tessera.core.errors import FailedPrecondition, FieldViolation, Relayed
from tessera.core.status import code_of, to_status

ME = "spiffe://t/client/me"


def test_the_remote_key_is_sha256_of_the_domain_the_caller_a_zero_byte_and_the_key() -> None:
    expected = hashlib.sha256(b"tessera/forwarded-command/v1\x00" + ME.encode() + b"\x00"
                              + b"k1").hexdigest()
    assert remote_key(ME, "k1") == expected
    assert len(expected) == 64


def test_two_callers_or_two_keys_never_share_a_remote_key() -> None:
    keys = {remote_key(ME, "k"), remote_key("spiffe://t/admin/me", "k"), remote_key(ME, "k2"),
            # The zero byte keeps ("…/m", "ek") apart from ("…/me", "k").
            remote_key("spiffe://t/client/m", "ek")}
    assert len(keys) == 4


def test_a_relayed_refusal_keeps_the_peers_code_and_details() -> None:
    peer = status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message="no")
    peer.details.add().Pack(error_details_pb2.ErrorInfo(reason="COMMAND_NOT_GRANTED"))
    exc = Relayed(code_pb2.PERMISSION_DENIED, "peer b: no", peer.SerializeToString(),
                  reason="COMMAND_NOT_GRANTED")
    out = to_status(exc)
    assert code_of(exc) == code_pb2.PERMISSION_DENIED
    assert (out.code, out.message) == (code_pb2.PERMISSION_DENIED, "peer b: no")
    info = error_details_pb2.ErrorInfo()
    assert out.details[0].Unpack(info) and info.reason == "COMMAND_NOT_GRANTED"


def test_a_failed_precondition_can_name_the_field() -> None:
    out = to_status(FailedPrecondition("no peer", reason="PEER_NOT_JOINED",
                                       violations=[FieldViolation("target", "not joined")]))
    assert out.code == code_pb2.FAILED_PRECONDITION
    br, info = error_details_pb2.BadRequest(), error_details_pb2.ErrorInfo()
    assert out.details[0].Unpack(br) and [v.field for v in br.field_violations] == ["target"]
    assert out.details[1].Unpack(info) and info.reason == "PEER_NOT_JOINED"
