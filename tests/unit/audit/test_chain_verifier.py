"""The streaming chain verifier: which record it blames, what it says, and when it stops.

`tessera audit verify` prints the verdict to an operator; the sequence and message are the
whole of what they get to find the damage, so both are checked exactly.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from tessera.audit import GENESIS, AuditEntry, AuditRow, ChainVerifier, Verdict, extend, verify

T0 = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)


def entry(i: int) -> AuditEntry:
    return AuditEntry(
        time=T0 + dt.timedelta(seconds=i), identity="spiffe://d/client/local", peer="",
        grant="", service="tessera.v1.QueryService", method="GetResource", kind="task",
        query_hash="ab" * 32, outcome="ALLOWED", status_code="OK", bytes_out=i,
        latency_us=10, trace_id="", reason="",
    )


def chain(n: int) -> list[AuditRow]:
    return extend(0, GENESIS, [entry(i) for i in range(n)])


def fed(rows: list[AuditRow], **anchor: object) -> tuple[ChainVerifier, list[bool]]:
    v = ChainVerifier(**anchor)  # type: ignore[arg-type]
    return v, [v.feed(r) for r in rows]


def test_an_intact_chain_is_accepted_row_by_row_and_at_its_head() -> None:
    rows = chain(3)
    v, results = fed(rows)
    assert results == [True, True, True]
    assert (v.last_sequence, v.last_hash, v.checked, v.bad) == (3, rows[-1].hash, 3, None)
    assert v.finish(3, rows[-1].hash) == Verdict(True, 3, 0, "")


def test_a_gap_names_the_first_missing_record() -> None:
    rows = chain(5)
    v, results = fed([rows[0], rows[1], rows[3], rows[4]])
    assert results == [True, True, False, False]
    assert v.finish(5, rows[-1].hash) == Verdict(False, 2, 3, "record 3 is missing")


def test_a_record_out_of_order_is_named_with_what_was_found() -> None:
    rows = chain(3)
    v, results = fed([rows[0], rows[1], rows[0]])
    assert results == [True, True, False]
    assert v.bad == Verdict(False, 2, 3, "record 3 is out of order (found 1 after 2)")
    # A repeated record is out of order too, not "missing".
    v, _ = fed([rows[0], rows[1], rows[1]])
    assert v.bad == Verdict(False, 2, 3, "record 3 is out of order (found 2 after 2)")


def test_a_changed_record_is_named_by_its_own_sequence() -> None:
    rows = chain(3)
    rows[1] = dataclasses.replace(rows[1], entry=entry(99))
    v, results = fed(rows)
    assert results == [True, False, False]
    assert v.bad == Verdict(False, 1, 2, "record 2 does not match its hash "
                                         "(changed, or a record before it was removed)")


def test_once_broken_the_verifier_keeps_its_first_verdict() -> None:
    rows = chain(4)
    v, _ = fed([rows[0], rows[2]])
    first = v.bad
    assert first == Verdict(False, 1, 2, "record 2 is missing")
    # Feeding the right row afterwards does not mend the chain or move the blame.
    assert v.feed(rows[1]) is False
    assert v.bad == first and v.checked == 1 and v.last_sequence == 1
    assert v.finish(4, rows[-1].hash) == first
    assert v.finish(0, GENESIS) == first


def test_rows_removed_from_the_end_are_caught_by_the_recorded_head() -> None:
    rows = chain(5)
    v, _ = fed(rows[:2])
    assert v.finish(5, rows[-1].hash) == Verdict(False, 2, 3, "records 3 to 5 are missing")
    v, _ = fed(rows[:4])
    assert v.finish(5, rows[-1].hash) == Verdict(False, 4, 5, "records 5 to 5 are missing")


def test_a_head_that_disagrees_with_the_last_row_is_refused() -> None:
    rows = chain(3)
    v, _ = fed(rows)
    # Same sequence, other hash: the last row was rewritten together with its hash.
    assert v.finish(3, rows[1].hash) == Verdict(
        False, 3, 3, "the chain head (record 3) does not match the log")
    # The head is behind the log: rows were appended without moving the head.
    assert v.finish(2, rows[1].hash) == Verdict(
        False, 3, 2, "the chain head (record 2) does not match the log")


def test_an_empty_head_against_a_non_empty_log_blames_the_last_record() -> None:
    rows = chain(2)
    v, _ = fed(rows)
    assert v.finish(0, GENESIS) == Verdict(
        False, 2, 2, "the chain head (record 0) does not match the log")


def test_an_empty_log_with_an_empty_head_verifies() -> None:
    assert ChainVerifier().finish(0, GENESIS) == Verdict(True, 0)
    assert ChainVerifier().finish(0, b"\1" * 32) == Verdict(
        False, 0, 0, "the chain head (record 0) does not match the log")


def test_after_pruning_the_chain_continues_from_the_anchor() -> None:
    rows = chain(5)
    anchor = rows[1]
    v, results = fed(rows[2:], anchor_sequence=anchor.sequence, anchor_hash=anchor.hash)
    assert results == [True, True, True]
    assert v.finish(5, rows[-1].hash) == Verdict(True, 3)
    # The anchor's hash is part of the check, not just its sequence.
    v, results = fed(rows[2:], anchor_sequence=2, anchor_hash=GENESIS)
    assert results == [False, False, False]
    assert v.bad is not None and v.bad.first_bad_sequence == 3


def test_verify_stops_at_the_first_bad_row_and_defaults_the_head_to_the_last_seen() -> None:
    rows = chain(4)
    assert verify(rows) == Verdict(True, 4)
    assert verify(rows[:2]) == Verdict(True, 2)
    assert verify([rows[0], rows[2], rows[3]]) == Verdict(False, 1, 2, "record 2 is missing")
    assert verify(rows[:2], head=(4, rows[-1].hash)) == Verdict(
        False, 2, 3, "records 3 to 4 are missing")
    assert verify(rows[2:], anchor_sequence=2, anchor_hash=rows[1].hash) == Verdict(True, 2)
