"""The pure audit chain: encoding, hashing, verification, query hash, outcome and kind."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json

import grpc
import pytest

from tessera.audit import (
    GENESIS,
    AuditEntry,
    AuditRow,
    Outcome,
    canonical,
    chain_hash,
    extend,
    kind_of,
    outcome_of,
    payload,
    prune_entry,
    query_hash,
    verify,
)
from tessera_client.pb import command_pb2, query_pb2, resources_pb2

T0 = dt.datetime(2026, 11, 21, 12, 0, 0, 123456, tzinfo=dt.UTC)


def entry(i: int = 0, **changes: object) -> AuditEntry:
    e = AuditEntry(
        time=T0 + dt.timedelta(milliseconds=i), identity="spiffe://tessera.local/client/local",
        peer="", grant="", service="tessera.v1.QueryService", method="GetResource",
        kind="task", query_hash="ab" * 32, outcome="ALLOWED", status_code="OK",
        bytes_out=120 + i, latency_us=800, trace_id="", reason="",
    )
    return dataclasses.replace(e, **changes)  # type: ignore[arg-type]


def test_hash_is_sha256_of_previous_hash_and_canonical_fields() -> None:
    e = entry()
    expected = hashlib.sha256(GENESIS + canonical(1, e)).digest()
    assert chain_hash(GENESIS, 1, e) == expected
    seq, _, body = canonical(1, e).partition(b"\n")
    assert seq == b"1" and body == payload(e)
    fields = json.loads(body)
    assert fields[0] == 1_795_262_400_123_456  # the time in microseconds since the epoch
    assert fields[1] == "spiffe://tessera.local/client/local"
    assert payload(entry(reason="naïve")).isascii(), "the database reads the same bytes"


def test_canonical_encoding_does_not_depend_on_the_time_zone_of_the_datetime() -> None:
    cet = dt.timezone(dt.timedelta(hours=1))
    assert canonical(1, entry()) == canonical(1, entry(time=T0.astimezone(cet)))


def test_every_field_is_covered_by_the_hash() -> None:
    base = chain_hash(GENESIS, 1, entry())
    for name, value in [("identity", "x"), ("peer", "p"), ("grant", "g"), ("service", "s"),
                        ("method", "m"), ("kind", "note"), ("query_hash", "cd" * 32),
                        ("outcome", "DENIED_BY_POLICY"), ("status_code", "NOT_FOUND"),
                        ("bytes_out", 0), ("latency_us", 1), ("trace_id", "t"),
                        ("reason", "r"), ("time", T0 + dt.timedelta(microseconds=1))]:
        assert chain_hash(GENESIS, 1, entry(**{name: value})) != base, name
    assert chain_hash(GENESIS, 2, entry()) != base, "sequence"


def test_an_intact_chain_verifies() -> None:
    rows = extend(0, GENESIS, [entry(i) for i in range(5)])
    assert [r.sequence for r in rows] == [1, 2, 3, 4, 5]
    verdict = verify(rows)
    assert verdict.ok and verdict.checked == 5


def test_extending_a_chain_continues_it() -> None:
    first = extend(0, GENESIS, [entry(0), entry(1)])
    more = extend(first[-1].sequence, first[-1].hash, [entry(2)])
    assert verify(first + more).ok


def test_a_changed_row_is_named() -> None:
    rows = extend(0, GENESIS, [entry(i) for i in range(5)])
    rows[2] = dataclasses.replace(rows[2], entry=entry(2, outcome="DENIED_BY_POLICY"))
    verdict = verify(rows)
    assert not verdict.ok and verdict.first_bad_sequence == 3 and verdict.checked == 2


def test_a_deleted_row_is_named() -> None:
    rows = extend(0, GENESIS, [entry(i) for i in range(5)])
    del rows[1]
    verdict = verify(rows)
    assert not verdict.ok and verdict.first_bad_sequence == 2
    assert "missing" in verdict.message


def test_deleted_last_rows_are_caught_by_the_head() -> None:
    rows = extend(0, GENESIS, [entry(i) for i in range(5)])
    head = (rows[-1].sequence, rows[-1].hash)
    verdict = verify(rows[:3], head=head)
    assert not verdict.ok and verdict.first_bad_sequence == 4


def test_a_rehashed_forgery_is_caught_by_the_next_row() -> None:
    rows = extend(0, GENESIS, [entry(i) for i in range(4)])
    forged_entry = entry(1, outcome="ALLOWED", identity="someone-else")
    rows[1] = dataclasses.replace(rows[1], entry=forged_entry,
                                  hash=chain_hash(rows[0].hash, 2, forged_entry))
    verdict = verify(rows, head=(4, rows[-1].hash))
    assert not verdict.ok and verdict.first_bad_sequence == 3


def pruned_log(n: int, upto: int) -> tuple[list[AuditRow], AuditRow]:
    """n rows pruned up to `upto`: the rows kept plus the prune record, and the anchor."""
    rows = extend(0, GENESIS, [entry(i) for i in range(n)])
    anchor = rows[upto - 1]
    record = extend(rows[-1].sequence, rows[-1].hash,
                    [prune_entry(T0, anchor.sequence, anchor.hash)])
    return rows[upto:] + record, anchor


def test_verification_starts_from_the_chained_prune_anchor() -> None:
    kept, anchor = pruned_log(6, 3)
    assert not verify(kept).ok, "without the anchor the remaining rows look truncated"
    verdict = verify(kept, anchor_sequence=anchor.sequence, anchor_hash=anchor.hash)
    assert verdict.ok and verdict.checked == 4


def test_a_moved_prune_anchor_is_detected() -> None:
    kept, anchor = pruned_log(8, 3)
    # Forge record 5 and move the anchor onto it, as if 4 and 5 had been pruned: the
    # rows the anchor now passes over are still in the table.
    forged = [r if r.sequence != 5 else dataclasses.replace(
        r, entry=dataclasses.replace(r.entry, identity="spiffe://x/admin/mallory"))
        for r in kept]
    moved = forged[1]
    verdict = verify(forged, anchor_sequence=moved.sequence, anchor_hash=moved.hash)
    assert not verdict.ok and verdict.first_bad_sequence == 4
    # ... and with those rows deleted too, the chained prune record names the true anchor.
    rest = [r for r in forged if r.sequence > moved.sequence]
    verdict = verify(rest, anchor_sequence=moved.sequence, anchor_hash=moved.hash)
    assert not verdict.ok and "anchor was moved" in verdict.message
    # A log with an anchor no prune record names fails too.
    bare = [r for r in kept if r.entry.method != "Prune"]
    verdict = verify(bare, anchor_sequence=anchor.sequence, anchor_hash=anchor.hash)
    assert not verdict.ok and "named by no prune record" in verdict.message


def test_records_with_detail_hash_as_before_without_it() -> None:
    plain = entry(1)
    assert payload(plain) == payload(dataclasses.replace(plain, detail={}))
    assert json.loads(payload(plain))[-1] == ""
    counted = dataclasses.replace(plain, detail={"source": "10.0.0.1/32", "count": 3})
    assert json.loads(payload(counted))[-1] == {"count": 3, "source": "10.0.0.1/32"}


def test_an_empty_log_verifies() -> None:
    assert verify([]).ok


@pytest.mark.parametrize(("code", "outcome"), [
    (grpc.StatusCode.OK, Outcome.ALLOWED),
    (grpc.StatusCode.PERMISSION_DENIED, Outcome.DENIED_BY_POLICY),
    (grpc.StatusCode.UNAUTHENTICATED, Outcome.DENIED_BY_POLICY),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, Outcome.RATE_LIMITED),
    (grpc.StatusCode.INVALID_ARGUMENT, Outcome.FAILED),
    (grpc.StatusCode.NOT_FOUND, Outcome.FAILED),
    (grpc.StatusCode.UNAVAILABLE, Outcome.FAILED),
    (grpc.StatusCode.INTERNAL, Outcome.FAILED),
])
def test_status_codes_map_to_outcomes(code: grpc.StatusCode, outcome: Outcome) -> None:
    assert outcome_of(code) is outcome


def _key(kind: str) -> resources_pb2.ResourceKey:
    return resources_pb2.ResourceKey(workspace="w", kind=kind, id="x")


def test_kind_is_read_from_wherever_the_request_names_it() -> None:
    assert kind_of(query_pb2.GetResourceRequest(key=_key("task"))) == "task"
    assert kind_of(query_pb2.ListResourcesRequest(kind="note")) == "note"
    put = command_pb2.ExecuteRequest(put_resource=command_pb2.PutResourceCommand(
        resource=resources_pb2.Resource(workspace="w", kind="memory", id="m")))
    assert kind_of(put) == "memory"
    delete = command_pb2.ExecuteRequest(
        delete_resource=command_pb2.DeleteResourceCommand(key=_key("document")))
    assert kind_of(delete) == "document"
    assert kind_of(query_pb2.DescribeRequest()) == ""
    assert kind_of(None) == ""


def test_query_hash_ignores_the_page_token_but_not_the_filters() -> None:
    a = query_hash(query_pb2.ListResourcesRequest(workspace="w", kind="task"))
    b = query_hash(query_pb2.ListResourcesRequest(workspace="w", kind="task", page_token="p2"))
    c = query_hash(query_pb2.ListResourcesRequest(workspace="w", kind="note"))
    assert a == b != c
    assert len(a) == 64 and int(a, 16) >= 0


def test_query_hash_separates_message_types_and_never_holds_the_body() -> None:
    empty_describe = query_hash(query_pb2.DescribeRequest())
    empty_list = query_hash(query_pb2.ListResourcesRequest())
    assert empty_describe != empty_list
    req = query_pb2.GetResourceRequest(key=_key("task"))
    req.key.id = "secret-id"
    assert "secret-id" not in query_hash(req)
    assert query_hash(None) == ""
