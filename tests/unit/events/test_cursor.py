"""Unit tests of tessera.events: cursor."""

from __future__ import annotations

import uuid

import pytest

from tessera.events import (
    CursorError,
    decode,
    encode,
)


def test_cursors_round_trip_and_are_bound_to_their_log() -> None:
    log = uuid.uuid4()
    for seq in (0, 1, 2**40):
        assert decode(encode(log, seq), log) == seq
    with pytest.raises(CursorError, match="another node"):
        decode(encode(uuid.uuid4(), 5), log)


@pytest.mark.parametrize("bad", ["", "5", "c1_", "c1_!!!!", "c1_" + "A" * 30, "x" * 65])
def test_malformed_cursors_are_refused(bad: str) -> None:
    with pytest.raises(CursorError):
        decode(bad, uuid.uuid4())
