"""`PackedVector`: float32 embeddings sent in pgvector's own forms, without a list."""

from __future__ import annotations

import math
from array import array

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pgvector import Vector

from tessera.store._resources import PackedVector, to_vector, vector_literal


@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), max_size=500))
def test_packed_vector_forms_are_pgvectors(values: list[float]) -> None:
    packed = array("f", values)
    before = packed.tobytes()
    vec = to_vector(packed)
    assert isinstance(vec, PackedVector)
    assert vec.to_binary() == Vector(values).to_binary()
    assert vec.to_text() == vector_literal(values)
    assert packed.tobytes() == before  # dumping leaves the caller's values as they were


def test_other_sequences_still_go_through_pgvector() -> None:
    assert isinstance(to_vector([1.0, 2.0]), Vector)
    assert isinstance(to_vector((1.0, math.pi)), Vector)
    assert isinstance(to_vector(array("d", [1.0])), Vector)  # not float32: no packed path
    with pytest.raises(ValueError, match="array"):
        PackedVector(array("d", [1.0]))
