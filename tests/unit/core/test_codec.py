"""Unit tests of tessera.core: codec."""

from __future__ import annotations

import datetime as dt

import pytest

from tessera.core.codec import parse_duration


def test_durations_parse_like_go() -> None:
    assert parse_duration("1h30m") == dt.timedelta(minutes=90)
    assert parse_duration("90s") == dt.timedelta(seconds=90)
    with pytest.raises(ValueError):
        parse_duration("10x")
