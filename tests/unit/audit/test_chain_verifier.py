"""The streaming chain verifier: which record it blames, what it says, and when it stops.

`tessera audit verify` prints the verdict to an operator; the sequence and message are the
whole of what they get to find the damage, so both are checked exactly.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from tessera.audit import (
    GENESIS,
    AuditEntry,
    AuditRow,
    ChainVerifier,
    Verdict,
    extend,
    prune_entry,
    verify,
)

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


def pruned(n: int, upto: int) -> tuple[list[AuditRow], AuditRow]:
    """n records pruned up to `upto`: the records kept, the prune record, and the anchor."""
    rows = chain(n)
    anchor = rows[upto - 1]
    record = extend(n, rows[-1].hash, [prune_entry(T0, anchor.sequence, anchor.hash)])
    return rows[upto:] + record, anchor


def test_after_pruning_the_chain_continues_from_the_chained_anchor() -> None:
    kept, anchor = pruned(5, 2)
    v, results = fed(kept, anchor_sequence=2, anchor_hash=anchor.hash)
    assert results == [True, True, True, True]
    assert v.finish(6, kept[-1].hash) == Verdict(True, 4)
    # The anchor's hash is part of the check, not just its sequence.
    v, results = fed(kept, anchor_sequence=2, anchor_hash=GENESIS)
    assert results == [False, False, False, False]
    assert v.bad is not None and v.bad.first_bad_sequence == 3


def test_a_record_left_at_or_before_the_anchor_means_the_anchor_was_moved() -> None:
    rows = chain(5)
    kept, anchor = pruned(5, 2)
    for left in (rows[1], rows[0]):
        v, results = fed([left, *kept], anchor_sequence=2, anchor_hash=anchor.hash)
        assert results == [False] * (len(kept) + 1)
        assert v.bad == Verdict(False, 0, left.sequence,
                                f"record {left.sequence} is at or before the prune anchor "
                                "(record 2): the anchor was moved")


def test_an_anchor_no_prune_record_names_is_refused() -> None:
    rows = chain(5)
    v, results = fed(rows[2:], anchor_sequence=2, anchor_hash=rows[1].hash)
    assert results == [True, True, True]
    assert v.finish(5, rows[-1].hash) == Verdict(
        False, 3, 2, "the prune anchor (record 2) is named by no prune record in the chain: "
                     "the anchor was moved or the prune record removed")


def test_an_anchor_moved_past_the_one_the_prune_chained_is_refused() -> None:
    kept, _ = pruned(6, 2)  # records 3..6 and prune record 7, which names record 2
    moved = kept[0]  # record 3: as if 3 had been pruned too
    v, _ = fed(kept[1:], anchor_sequence=3, anchor_hash=moved.hash)
    assert v.finish(7, kept[-1].hash) == Verdict(
        False, 4, 7, "the prune anchor (record 3) is not the one prune record 7 chained "
                     "(record 2): the anchor was moved")


def test_the_newest_prune_record_names_the_anchor() -> None:
    rows = chain(6)
    first = extend(6, rows[-1].hash, [prune_entry(T0, 2, rows[1].hash)])  # record 7
    # A later prune deletes up to record 5 and chains record 8 naming it.
    second = extend(7, first[0].hash, [prune_entry(T0, 5, rows[4].hash)])
    remaining = [rows[5], *first, *second]
    v, results = fed(remaining, anchor_sequence=5, anchor_hash=rows[4].hash)
    assert results == [True, True, True]
    assert v.finish(8, second[0].hash) == Verdict(True, 3)
    # Started from the first prune's anchor instead, the newer record disagrees.
    assert verify([*rows[2:], *first, *second], anchor_sequence=2,
                  anchor_hash=rows[1].hash).message == (
        "the prune anchor (record 2) is not the one prune record 8 chained (record 5): "
        "the anchor was moved")


def test_a_prune_record_whose_anchor_cannot_be_read_vouches_for_no_anchor() -> None:
    rows = chain(4)
    broken = dataclasses.replace(prune_entry(T0, 2, rows[1].hash), detail={"anchor": 2})
    record = extend(4, rows[-1].hash, [broken])
    verdict = verify([*rows[2:], *record], anchor_sequence=2, anchor_hash=rows[1].hash)
    assert verdict == Verdict(False, 3, 5, "the prune anchor (record 2) is not the one prune "
                                           "record 5 chained (record -1): the anchor was moved")


def test_only_the_audit_service_s_prune_method_names_an_anchor() -> None:
    rows = chain(4)
    genuine = prune_entry(T0, 2, rows[1].hash)
    for lookalike in (dataclasses.replace(genuine, service="tessera.v1.AdminService"),
                      dataclasses.replace(genuine, method="GetNodeInfo")):
        record = extend(4, rows[-1].hash, [lookalike])
        verdict = verify([*rows[2:], *record], anchor_sequence=2, anchor_hash=rows[1].hash)
        assert not verdict.ok and "named by no prune record" in verdict.message


def test_a_prune_record_in_a_log_verified_from_genesis_must_name_genesis() -> None:
    rows = chain(3)
    record = extend(3, rows[-1].hash, [prune_entry(T0, 0, GENESIS)])
    assert verify([*rows, *record]) == Verdict(True, 4)
    claims = extend(3, rows[-1].hash, [prune_entry(T0, 2, rows[1].hash)])
    assert verify([*rows, *claims]) == Verdict(
        False, 4, 4, "the prune anchor (record 0) is not the one prune record 4 chained "
                     "(record 2): the anchor was moved")


def test_verify_stops_at_the_first_bad_row_and_defaults_the_head_to_the_last_seen() -> None:
    rows = chain(4)
    assert verify(rows) == Verdict(True, 4)
    assert verify(rows[:2]) == Verdict(True, 2)
    assert verify([rows[0], rows[2], rows[3]]) == Verdict(False, 1, 2, "record 2 is missing")
    assert verify(rows[:2], head=(4, rows[-1].hash)) == Verdict(
        False, 2, 3, "records 3 to 4 are missing")
    kept, anchor = pruned(4, 2)
    assert verify(kept, anchor_sequence=2, anchor_hash=anchor.hash) == Verdict(True, 3)
