"""Unit tests of tessera.federation: follow."""

from __future__ import annotations

import random
import uuid

from tessera.federation import backoff_s, received_of
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
