"""The hand-rolled protobuf encoding of resources (api/_convert.py) against protobuf's own."""

from __future__ import annotations

import datetime as dt
import enum
import math
from array import array
from typing import Any

import pytest
from google.protobuf import struct_pb2, timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

from tessera.api._convert import _set_time, dict_to_struct, resource_to_pb, struct_bytes
from tessera.store import Resource
from tessera_client.pb import resources_pb2

_scalars = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) \
    | st.floats(allow_nan=False) | st.text()
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(), inner, max_size=4), max_leaves=20)


@given(st.dictionaries(st.text(), _json, max_size=6))
def test_struct_bytes_parse_to_what_struct_update_builds(value: dict[str, Any]) -> None:
    parsed = struct_pb2.Struct()
    parsed.ParseFromString(struct_bytes(value))
    assert parsed == dict_to_struct(value)


@given(st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31),
                    timezones=st.none() | st.just(dt.UTC)
                    | st.builds(lambda m: dt.timezone(dt.timedelta(minutes=m)),
                                st.integers(-900, 900))))
def test_set_time_equals_from_datetime(value: dt.datetime) -> None:
    try:
        want = timestamp_pb2.Timestamp()
        want.FromDatetime(value)
    except (ValueError, OverflowError):
        return  # outside Timestamp's range: the database never holds such a time
    got = timestamp_pb2.Timestamp()
    _set_time(got, value)
    assert (got.seconds, got.nanos) == (want.seconds, want.nanos)


def test_resource_to_pb_matches_the_generic_construction() -> None:
    now = dt.datetime(2026, 11, 28, 17, 0, 1, 123456, tzinfo=dt.UTC)
    r = Resource(workspace="w", kind="task", id="a:1", title="T", body="B",
                 attributes={"n": 1, "l": [True, None, "x"], "d": {"f": 0.5}},
                 embedding=[0.25, -1.0, math.pi], owner="o", team="t", version=3,
                 created_at=now, updated_at=now + dt.timedelta(seconds=1))
    want = resources_pb2.Resource(
        workspace=r.workspace, kind=r.kind, id=r.id, title=r.title, body=r.body,
        attributes=dict_to_struct(r.attributes), embedding=r.embedding, owner=r.owner,
        team=r.team, version=r.version, etag=r.etag, source="peer-a")
    want.create_time.FromDatetime(now)
    want.update_time.FromDatetime(now + dt.timedelta(seconds=1))
    assert resource_to_pb(r, source="peer-a") == want
    # An empty attributes object is still present, as Struct.update leaves it.
    bare = resource_to_pb(Resource(workspace="w", kind="task", id="b"))
    assert bare.HasField("attributes") and not bare.HasField("create_time")
    assert not bare.embedding


# -- the search statement, cached per query shape (store/_search.py) ----------------------

@given(k=st.integers(1, 200), vector=st.booleans(), text=st.text(min_size=1, max_size=5),
       use_text=st.booleans(), workspace=st.sampled_from(["", "w1"]),
       kind=st.sampled_from(["", "task"]), attributes=st.sampled_from([{}, {"p": 1}]),
       since=st.sampled_from([None, dt.datetime(2026, 1, 1, tzinfo=dt.UTC)]),
       embeddings=st.booleans(), scoped=st.booleans(),
       metric=st.sampled_from(["cosine", "l2", "inner_product"]))
def test_cached_search_statement_equals_the_composed_one(
        k: int, vector: bool, text: str, use_text: bool, workspace: str, kind: str,
        attributes: dict[str, Any], since: dt.datetime | None, embeddings: bool, scoped: bool,
        metric: Any) -> None:
    from psycopg import sql

    from tessera.store import Predicate, SearchQuery, search_statement
    from tessera.store._search import composed_statement

    if not vector and not use_text:
        use_text = True
    q = SearchQuery(k=k, embedding=[0.5, -0.25] if vector else None,
                    text=text if use_text else "", workspace=workspace, kind=kind,
                    attributes=attributes, updated_since=since, include_embeddings=embeddings)
    scope = Predicate(sql.SQL("(kind = ANY(%s::text[]) AND owner <> %s)"),
                      (["task"], "bob")) if scoped else None
    fast, fast_params = search_statement(q, metric=metric, scope=scope)
    slow, slow_params = composed_statement(q, metric=metric, scope=scope)
    assert fast.as_string() == slow.as_string()
    assert fast_params == slow_params


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=50))
def test_all_finite_agrees_with_the_element_wise_check(values: list[float]) -> None:
    from tessera.api._validate import all_finite

    assert all_finite(values) == all(math.isfinite(v) for v in values)


def test_all_finite_with_an_overflowing_sum_of_finite_values() -> None:
    from tessera.api._validate import all_finite

    assert all_finite([1.7e308, 1.7e308])
    assert not all_finite([1.7e308, 1.7e308, math.nan])


def test_struct_bytes_of_subclasses_and_huge_numbers() -> None:
    class Text(str):
        def __str__(self) -> str:
            return self  # str(v) would recurse; the characters are what is encoded

    class Level(str, enum.Enum):  # noqa: UP042 - str() of it is "Level.HIGH", not "high"
        HIGH = "high"

    for value in ({"t": Text("a")}, {"l": Level.HIGH}, {"i": enum.IntEnum("N", "ONE").ONE},
                  {"b": True, "n": 2**60}):
        parsed = struct_pb2.Struct()
        parsed.ParseFromString(struct_bytes(value))
        assert parsed == dict_to_struct({k: v for k, v in value.items()})
    with pytest.raises(OverflowError):
        struct_bytes({"x": 10**400})


@given(st.lists(st.floats(width=32), max_size=300))
def test_a_float32_array_embedding_encodes_as_the_same_list_would(values: list[float]) -> None:
    # array('f') is how the store reads a vector; it goes in as packed wire bytes.
    as_list = resource_to_pb(Resource(workspace="w", kind="k", id="i", embedding=values))
    as_array = resource_to_pb(Resource(workspace="w", kind="k", id="i",
                                       embedding=array("f", values)))
    assert as_array.SerializeToString() == as_list.SerializeToString()
