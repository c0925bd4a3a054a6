"""Audit rows as read from the database and as exported: both must still verify.

A row read back from `audit_log` has to rebuild exactly the entry that was hashed, and an
exported line has to carry everything a reader needs to recompute its hash without us.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any

import pytest

from tessera.audit import (
    GENESIS,
    AuditEntry,
    AuditRow,
    chain_hash,
    extend,
    prune_entry,
    verify,
)
from tessera.audit._chain import entry_from_row

T0 = dt.datetime(2026, 11, 21, 12, 0, 0, 123456, tzinfo=dt.UTC)


def entry(i: int) -> AuditEntry:
    """Every field distinct from every other, so a swapped column cannot go unnoticed."""
    return AuditEntry(
        time=T0 + dt.timedelta(seconds=i), identity=f"spiffe://d/node/peer-{i}",
        peer=f"peer-{i}", grant=f"grants/g-{i}", service="tessera.v1.QueryService",
        method="ListResources", kind="task", query_hash=f"{i:02x}" * 32,
        outcome="DENIED_BY_POLICY", status_code="PERMISSION_DENIED", bytes_out=1000 + i,
        latency_us=7000 + i, trace_id=f"trace-{i}", reason="KIND_NOT_GRANTED",
    )


def db_row(row: AuditRow) -> dict[str, Any]:
    """The row as the audit_log table returns it (integers as the driver gives them)."""
    e = row.entry
    return {
        "sequence": row.sequence, "time": e.time, "identity": e.identity, "peer": e.peer,
        "grant_name": e.grant, "service": e.service, "method": e.method, "kind": e.kind,
        "query_hash": e.query_hash, "outcome": e.outcome, "status_code": e.status_code,
        "bytes_out": e.bytes_out, "latency_us": e.latency_us, "trace_id": e.trace_id,
        "reason": e.reason, "detail": dict(e.detail), "hash": row.hash,
    }


def test_a_row_read_back_from_the_table_is_the_entry_that_was_hashed() -> None:
    rows = extend(0, GENESIS, [entry(i) for i in range(3)])
    read = [AuditRow(r["sequence"], entry_from_row(r), r["hash"]) for r in map(db_row, rows)]
    assert [r.entry for r in read] == [entry(i) for i in range(3)]
    verdict = verify(read)
    assert verdict.ok and verdict.checked == 3


def test_a_prune_record_read_back_keeps_its_detail_and_verifies() -> None:
    rows = extend(0, GENESIS, [entry(0), prune_entry(T0, 0, GENESIS)])
    read = [AuditRow(r["sequence"], entry_from_row(r), r["hash"]) for r in map(db_row, rows)]
    assert read[1].entry.detail == {"anchor_hash": "00" * 32, "anchor_sequence": 0}
    assert verify(read).ok


def test_a_detail_column_read_in_another_key_order_still_verifies() -> None:
    # jsonb returns keys shortest first, not in the order they were written.
    written = dataclasses.replace(entry(1), detail={"aaa": 1, "zz": [1, 2]})
    row = db_row(extend(0, GENESIS, [written])[0])
    row["detail"] = {"zz": [1, 2], "aaa": 1}
    assert verify([AuditRow(1, entry_from_row(row), row["hash"])]).ok


def test_rows_from_before_records_had_detail_read_as_having_none() -> None:
    rows = extend(0, GENESIS, [entry(2)])
    for detail in ({}, None, "absent"):
        row = db_row(rows[0])
        if detail == "absent":
            del row["detail"]
        else:
            row["detail"] = detail
        e = entry_from_row(row)
        assert e.detail == {} and e == entry(2)
        assert verify([AuditRow(1, e, rows[0].hash)]).ok


def test_numeric_columns_read_as_text_still_rebuild_integers() -> None:
    # Some drivers and exports hand bigint columns back as strings or Decimals.
    row = db_row(extend(0, GENESIS, [entry(5)])[0])
    row["bytes_out"], row["latency_us"] = "1005", 7005.0
    e = entry_from_row(row)
    assert (e.bytes_out, e.latency_us) == (1005, 7005)
    assert type(e.bytes_out) is int and type(e.latency_us) is int
    assert chain_hash(GENESIS, 1, e) == chain_hash(GENESIS, 1, entry(5))


def test_a_row_missing_a_column_is_refused_rather_than_guessed() -> None:
    full = db_row(extend(0, GENESIS, [entry(1)])[0])
    for column in ("time", "identity", "peer", "grant_name", "service", "method", "kind",
                   "query_hash", "outcome", "status_code", "bytes_out", "latency_us",
                   "trace_id", "reason"):
        row = {k: v for k, v in full.items() if k != column}
        with pytest.raises(KeyError):
            entry_from_row(row)


def test_an_exported_line_is_exactly_the_documented_record() -> None:
    first, second = extend(0, GENESIS, [entry(0), entry(1)])
    assert second.to_json(first.hash) == {
        "sequence": 2, "time": "2026-11-21T12:00:01.123456+00:00",
        "identity": "spiffe://d/node/peer-1", "peer": "peer-1", "grant": "grants/g-1",
        "service": "tessera.v1.QueryService", "method": "ListResources", "kind": "task",
        "query_hash": "01" * 32, "outcome": "DENIED_BY_POLICY",
        "status_code": "PERMISSION_DENIED", "bytes_out": 1001, "latency_us": 7001,
        "trace_id": "trace-1", "reason": "KIND_NOT_GRANTED",
        "prev_hash": first.hash.hex(), "hash": second.hash.hex(),
    }


def test_an_exported_prune_record_carries_its_detail() -> None:
    (row,) = extend(0, GENESIS, [prune_entry(T0, 7, b"\1" * 32)])
    line = row.to_json(GENESIS)
    assert line["detail"] == {"anchor_hash": "01" * 32, "anchor_sequence": 7}
    assert (line["service"], line["method"], line["reason"]) == (
        "tessera.audit", "Prune", "AUDIT_PRUNED")


def test_a_reader_recomputes_every_exported_hash_from_the_lines_alone() -> None:
    rows = extend(0, GENESIS, [*(entry(i) for i in range(4)), prune_entry(T0, 0, GENESIS)])
    prev = GENESIS
    lines = []
    for row in rows:
        lines.append(json.dumps(row.to_json(prev)))
        prev = row.hash
    for line in lines:
        d = json.loads(line)
        e = AuditEntry(
            time=dt.datetime.fromisoformat(d["time"]), identity=d["identity"], peer=d["peer"],
            grant=d["grant"], service=d["service"], method=d["method"], kind=d["kind"],
            query_hash=d["query_hash"], outcome=d["outcome"], status_code=d["status_code"],
            bytes_out=d["bytes_out"], latency_us=d["latency_us"], trace_id=d["trace_id"],
            reason=d["reason"], detail=d.get("detail", {}),
        )
        recomputed = chain_hash(bytes.fromhex(d["prev_hash"]), d["sequence"], e)
        assert recomputed.hex() == d["hash"]
    # ...and an edited line no longer does.
    d = json.loads(lines[2])
    forged = dataclasses.replace(rows[2].entry, outcome="ALLOWED")
    assert chain_hash(bytes.fromhex(d["prev_hash"]), d["sequence"], forged).hex() != d["hash"]
