"""Pure parts of following: the reconnection backoff and checking a peer's envelopes."""

from __future__ import annotations

import datetime as dt
import random
import uuid

import pytest

from tessera.doctor import Level, check_follow
from tessera.federation import backoff_s, received_of
from tessera.store import Follow
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


def _follow(state: str, *, updated_s_ago: float = 0.0, error: str = "") -> Follow:
    now = dt.datetime.now(dt.UTC)
    return Follow(peer="b", enabled=True, type_patterns=["task.*"], cursor="c1_x",
                  state=state, last_error=error, received=3, duplicates=1,
                  last_event_time=now - dt.timedelta(seconds=2),
                  last_received_at=now - dt.timedelta(seconds=1),
                  updated_at=now - dt.timedelta(seconds=updated_s_ago))


def test_doctor_follow_check_is_green_connected_yellow_reconnecting_red_when_long_down() -> None:
    assert check_follow(_follow("connected")).level is Level.GREEN
    assert check_follow(_follow("standby")).level is Level.GREEN
    recent = check_follow(_follow("backoff", updated_s_ago=5, error="UNAVAILABLE: down"))
    assert recent.level is Level.YELLOW and "UNAVAILABLE: down" in recent.message
    assert recent.details["lag_seconds"] == pytest.approx(1.0, abs=0.1)
    long_down = check_follow(_follow("backoff", updated_s_ago=3600, error="UNAVAILABLE"))
    assert long_down.level is Level.RED
    assert check_follow(_follow("starting")).level is Level.YELLOW
