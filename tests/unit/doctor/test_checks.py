"""Unit tests of tessera.doctor: checks."""

from __future__ import annotations

import datetime as dt

import pytest

from tessera.doctor import Level, check_follow
from tessera.store import Follow


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
