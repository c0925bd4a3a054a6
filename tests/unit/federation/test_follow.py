"""Unit tests of tessera.federation: follow."""

from __future__ import annotations

import random
import uuid

import grpc

from tessera.federation import backoff_s, describe, received_of
from tessera_client.pb import events_pb2, resources_pb2


def test_backoff_doubles_is_bounded_and_jittered() -> None:
    rng = random.Random(7)
    ceilings = [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    for attempt, ceiling in enumerate(ceilings):
        waits = [backoff_s(attempt, 10.0, rng) for _ in range(200)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits), attempt
        assert max(waits) - min(waits) > ceiling / 4  # jittered, not a fixed wait
    assert backoff_s(10_000, 3.0, rng) <= 3.0


def test_a_well_formed_envelope_becomes_a_received_event() -> None:
    eid = uuid.uuid4()
    msg = events_pb2.EventEnvelope(type="task.done", id=str(eid), actor="spiffe://b/user/x",
                                   subject=resources_pb2.ResourceKey(workspace="acme",
                                                                     kind="task", id="t1"))
    msg.data.update({"n": 1})
    msg.time.GetCurrentTime()
    got = received_of(msg)
    assert got is not None
    assert (got.origin_id, got.type, got.workspace, got.kind, got.resource_id, got.data) == (
        eid, "task.done", "acme", "task", "t1", {"n": 1})
    assert got.origin_time is not None


def test_malformed_envelopes_are_refused() -> None:
    good = {"type": "task.done", "id": str(uuid.uuid4())}
    for bad in ({"type": "Task Done"}, {"type": "x" * 200 + ".y"}, {"type": "nodot"},
                {"id": "not-a-uuid"}, {"actor": "a" * 300}):
        assert received_of(events_pb2.EventEnvelope(**{**good, **bad})) is None, bad


def test_payloads_jsonb_cannot_hold_or_beyond_the_limit_are_malformed() -> None:
    """A followed peer's event that could never be stored (NUL, NaN) would fail its batch on
    every retry and stall the follow for good; one above this node's own payload limit
    would let the peer fill this node's disk. Both are dropped as malformed."""
    def env(**data: object) -> events_pb2.EventEnvelope:
        msg = events_pb2.EventEnvelope(type="task.done", id=str(uuid.uuid4()))
        msg.data.update(data)
        return msg

    assert received_of(env(ok="fine")) is not None
    assert received_of(env(bad="a\x00b")) is None
    assert received_of(env(**{"k\x00": 1})) is None
    assert received_of(env(nested={"deep": [float("nan")]})) is None
    assert received_of(env(inf=float("inf"))) is None
    assert received_of(env(blob="x" * 2000), max_payload=1024) is None
    assert received_of(env(blob="x" * 900), max_payload=1024) is not None
    nul_subject = env(ok=1)
    nul_subject.subject.workspace = "ac\x00me"
    assert received_of(nul_subject) is None


def test_a_time_out_of_range_is_malformed_not_a_stall() -> None:
    msg = events_pb2.EventEnvelope(type="task.done", id=str(uuid.uuid4()))
    msg.time.seconds = 10**12  # past year 9999: datetime cannot hold it
    assert received_of(msg) is None


def test_a_peers_error_text_reaches_logs_and_peers_list_without_control_characters() -> None:
    exc = grpc.aio.AioRpcError(grpc.StatusCode.PERMISSION_DENIED, grpc.aio.Metadata(),
                               grpc.aio.Metadata(),
                               details="denied\n2026-01-01 CRITICAL forged\x1b[2J\x07")
    text = describe(exc)
    assert text.isprintable() and "\n" not in text and "\x1b" not in text
    assert text.startswith("PERMISSION_DENIED: denied")


def test_a_payload_within_the_limit_is_kept_whatever_its_wire_size() -> None:
    """The early refusal goes by wire size; a Struct of small numbers is several times
    larger on the wire than as JSON, and must still be kept while its JSON fits."""
    for dense in ([1] * 15000, [True] * 12000, {f"k{i}": 1 for i in range(4000)},
                  [None] * 12000):
        msg = events_pb2.EventEnvelope(type="task.done", id=str(uuid.uuid4()))
        msg.data.update({"v": dense})
        if dense == [1] * 15000:
            assert msg.data.ByteSize() > 2 * 64 * 1024  # 30 KB as JSON, 165 KB on the wire
        assert received_of(msg, max_payload=64 * 1024) is not None, type(dense)
