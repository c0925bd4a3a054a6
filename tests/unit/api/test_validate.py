"""The generic request walker: every string, number and Value of any request is checked."""

from __future__ import annotations

import math
import struct

import pytest
from google.protobuf import struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.api._validate import MAX_STRING, Checker, check_message, float32s
from tessera.core import errors
from tessera.core.errors import InvalidArgument
from tessera_client.pb import command_pb2, query_pb2, resources_pb2


def fields_named(exc: pytest.ExceptionInfo[InvalidArgument]) -> list[str]:
    return [v.field for v in exc.value.violations]


def test_a_clean_request_passes() -> None:
    attrs = struct_pb2.Struct()
    attrs.update({"n": 1.5, "s": "ok", "l": [1, "x", {"d": True}]})
    check_message(command_pb2.ExecuteRequest(
        idempotency_key="k", put_resource=command_pb2.PutResourceCommand(
            resource=resources_pb2.Resource(workspace="w", kind="task", id="i", title="t",
                                            attributes=attrs, embedding=[0.1, 0.2]))))


def test_nul_anywhere_is_named_by_its_path() -> None:
    req = query_pb2.ListResourcesRequest(team="a\x00", start_after=resources_pb2.ResourceKey(
        id="\x00"))
    with pytest.raises(InvalidArgument) as exc:
        check_message(req)
    assert fields_named(exc) == ["team", "start_after.id"]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_in_values_vectors_and_doubles_are_named(bad: float) -> None:
    attrs = struct_pb2.Struct()
    attrs.update({"top": bad, "nested": {"deeper": [0, bad]}})
    req = command_pb2.ExecuteRequest(put_resource=command_pb2.PutResourceCommand(
        resource=resources_pb2.Resource(attributes=attrs, embedding=[1.0, bad, bad])))
    with pytest.raises(InvalidArgument) as exc:
        check_message(req)
    assert sorted(fields_named(exc)) == sorted([
        "put_resource.resource.attributes.top",
        "put_resource.resource.attributes.nested.deeper[1]",
        "put_resource.resource.embedding"])
    with pytest.raises(InvalidArgument) as exc:
        check_message(query_pb2.SearchResourcesRequest(min_score=bad))
    assert fields_named(exc) == ["min_score"]


def test_struct_keys_and_overlong_strings_are_refused() -> None:
    attrs = struct_pb2.Struct()
    attrs.update({"k\x00": 1})
    with pytest.raises(InvalidArgument) as exc:
        check_message(resources_pb2.Resource(attributes=attrs, body="b" * (MAX_STRING + 1)))
    assert sorted(fields_named(exc)) == ["attributes.k\\x00 (key)", "body"]


def test_a_flood_of_violations_is_capped() -> None:
    req = query_pb2.ListResourcesRequest(attribute_filters=[
        query_pb2.AttributeFilter(key="\x00") for _ in range(500)])
    with pytest.raises(InvalidArgument) as exc:
        check_message(req)
    assert 0 < len(exc.value.violations) <= 20


def test_the_wire_fast_path_refuses_exactly_what_the_walk_refuses() -> None:
    attrs = struct_pb2.Struct()
    attrs.update({"n": math.nan})
    bad = [query_pb2.GetResourceRequest(key=resources_pb2.ResourceKey(id="a\x00")),
           query_pb2.ListResourcesRequest(owner="x\x00"),
           resources_pb2.Resource(attributes=attrs),
           query_pb2.SearchResourcesRequest(embedding=[math.inf]),
           resources_pb2.Resource(title="t" * (MAX_STRING + 1))]
    for message in bad:
        with pytest.raises(InvalidArgument):
            check_message(message, message.SerializeToString())
    good = query_pb2.GetResourceRequest(key=resources_pb2.ResourceKey(workspace="w", id="é"))
    check_message(good, good.SerializeToString())


def test_checker_collects_every_violation() -> None:
    c = Checker()
    c.embedding("e", [1.0, math.inf], 2)
    c.embedding("f", [1.0], 2)
    c.kind("k", "ghost", {"task"})
    assert c.page_size("p", 0) == 100
    with pytest.raises(errors.InvalidArgument) as exc:
        c.done()
    assert [v.field for v in exc.value.violations] == ["e", "f", "k"]


@settings(max_examples=200)
@given(st.lists(st.floats(width=32), max_size=600), st.integers(0, 200), st.text(max_size=5))
def test_float32s_copies_a_repeated_float_field_exactly(values: list[float], k: int,
                                                        text: str) -> None:
    # Other fields set around it are not part of the copy; NaN and infinities survive.
    req = query_pb2.SearchResourcesRequest(k=k, text=text, embedding=values)
    got = float32s(req, "embedding")
    assert got.typecode == "f"
    assert [struct.pack("<f", v) for v in got] == [struct.pack("<f", v) for v in values]
    # The walker's check on those values: a finite sum of float32s proves each finite.
    assert math.isfinite(sum(got)) == all(math.isfinite(v) for v in values)


def test_float32s_of_the_largest_float32s_is_finite_and_caught_when_not() -> None:
    big = struct.unpack("<f", struct.pack("<I", 0x7F7FFFFF))[0]  # the largest finite float32
    req = query_pb2.SearchResourcesRequest(embedding=[big] * 5000)
    check_message(req, req.SerializeToString())  # 5000 x 3.4e38 does not overflow a double
    req.embedding.append(math.inf)
    with pytest.raises(InvalidArgument) as exc:
        check_message(req, req.SerializeToString())
    assert fields_named(exc) == ["embedding"]


def test_float32s_refuses_a_field_that_is_not_float32() -> None:
    # Doubles would be rounded to float32 (1e300 to inf) without a word.
    with pytest.raises(TypeError, match="min_score"):
        float32s(query_pb2.SearchResourcesRequest(min_score=1e300), "min_score")
