"""The audit record, its canonical encoding and the hash chain. Pure functions: no I/O.

Each record's hash is SHA-256(previous hash || canonical encoding of the record), the first
record chaining to 32 zero bytes (or to the anchor left by pruning). The canonical encoding
is the decimal sequence, a newline and the payload: compact ASCII JSON of a fixed-order
array of every other field, the time as integer microseconds since the epoch. Anyone with
the rows (or an export) can recompute the chain; the database function that appends
batches (migration 0003) computes the same hashes.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import Message

#: The hash the first record of a fresh log chains to.
GENESIS = bytes(32)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
#: Request fields left out of the query hash: they choose a page, not the question asked.
PAGING_FIELDS = frozenset({"page_token"})
#: The service and method of the record a prune appends, naming the anchor it left.
AUDIT_SERVICE = "tessera.audit"
PRUNE_METHOD = "Prune"
#: Where a request names a resource kind, in the order they are tried.
_KIND_PATHS = (("key", "kind"), ("kind",), ("put_resource", "resource", "kind"),
               ("delete_resource", "key", "kind"))


class Outcome(enum.Enum):
    """How an audited call ended; the values are the names in `AuditOutcome`."""

    ALLOWED = "ALLOWED"
    DENIED_BY_POLICY = "DENIED_BY_POLICY"
    RATE_LIMITED = "RATE_LIMITED"
    FAILED = "FAILED"


def outcome_of(code: grpc.StatusCode) -> Outcome:
    """The audit outcome of a call that ended with `code`."""
    if code is grpc.StatusCode.OK:
        return Outcome.ALLOWED
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return Outcome.DENIED_BY_POLICY
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Outcome.RATE_LIMITED
    return Outcome.FAILED


@dataclass(frozen=True)
class AuditEntry:
    """One call's audit fields, before it has a place in the chain."""

    time: dt.datetime
    identity: str
    peer: str
    grant: str
    service: str
    method: str
    kind: str
    query_hash: str
    #: An `Outcome` value; kept as text so a tampered row still reads (and fails to verify).
    outcome: str
    status_code: str
    bytes_out: int
    latency_us: int
    trace_id: str
    reason: str
    #: Extra fields of special records (a prune's anchor, an aggregated count); empty for
    #: an ordinary call, whose encoding is then exactly the 14-field one.
    detail: Mapping[str, Any] = field(default_factory=dict)


def prune_entry(time: dt.datetime, anchor_sequence: int, anchor_hash: bytes) -> AuditEntry:
    """The record a prune appends: the anchor it left becomes part of the chain."""
    return AuditEntry(time, "", "", "", AUDIT_SERVICE, PRUNE_METHOD, "", "",
                      Outcome.ALLOWED.value, "OK", 0, 0, "", "AUDIT_PRUNED",
                      {"anchor_hash": anchor_hash.hex(), "anchor_sequence": anchor_sequence})


def anchor_named_by(entry: AuditEntry) -> tuple[int, str] | None:
    """(sequence, hash hex) of the anchor a prune record names; None for other records."""
    if entry.service != AUDIT_SERVICE or entry.method != PRUNE_METHOD:
        return None
    try:
        return int(entry.detail["anchor_sequence"]), str(entry.detail["anchor_hash"])
    except (KeyError, TypeError, ValueError):
        return (-1, "")


@dataclass(frozen=True)
class AuditRow:
    """A record in the chain: its sequence, fields and hash."""

    sequence: int
    entry: AuditEntry
    hash: bytes

    def to_json(self, prev_hash: bytes) -> dict[str, Any]:
        """A JSON-ready dict, as exported; `prev_hash` lets a reader check each line."""
        e = self.entry
        return {
            "sequence": self.sequence, "time": e.time.isoformat(), "identity": e.identity,
            "peer": e.peer, "grant": e.grant, "service": e.service, "method": e.method,
            "kind": e.kind, "query_hash": e.query_hash, "outcome": e.outcome,
            "status_code": e.status_code, "bytes_out": e.bytes_out,
            "latency_us": e.latency_us, "trace_id": e.trace_id, "reason": e.reason,
            **({"detail": dict(e.detail)} if e.detail else {}),
            "prev_hash": prev_hash.hex(), "hash": self.hash.hex(),
        }


def micros(t: dt.datetime) -> int:
    """Microseconds since the epoch (PostgreSQL's timestamptz precision)."""
    delta = t - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


#: json.dumps(..., separators=(",", ":"), sort_keys=True), without a new encoder per call.
_encode = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode


def payload(e: AuditEntry) -> bytes:
    """A record's fields as compact ASCII JSON, in a fixed order (the sequence aside)."""
    fields: list[Any] = [micros(e.time), e.identity, e.peer, e.grant, e.service, e.method,
                         e.kind, e.query_hash, e.outcome, e.status_code, e.bytes_out,
                         e.latency_us, e.trace_id, e.reason]
    detail: Any = e.detail  # as stored: a tampered row may hold any JSON value here
    if not isinstance(detail, Mapping):
        # Hashed as it is: a detail set to null, [] or a list of pairs must not hash like
        # an empty or equal object (the row would verify unchanged).
        fields.append(detail)
    elif detail:
        fields.append(dict(detail))
    return _encode(fields).encode()


def canonical(sequence: int, e: AuditEntry) -> bytes:
    """The bytes a record's hash covers: its sequence, a newline, then its payload."""
    return b"%d\n" % sequence + payload(e)


def chain_hash(prev: bytes, sequence: int, entry: AuditEntry) -> bytes:
    """SHA-256(prev || canonical(sequence, entry))."""
    return hashlib.sha256(prev + canonical(sequence, entry)).digest()


def extend(prev_sequence: int, prev_hash: bytes, entries: Iterable[AuditEntry]) -> list[AuditRow]:
    """Chain `entries` after the record (`prev_sequence`, `prev_hash`)."""
    rows = []
    seq, h = prev_sequence, prev_hash
    for entry in entries:
        seq += 1
        h = chain_hash(h, seq, entry)
        rows.append(AuditRow(seq, entry, h))
    return rows


@dataclass(frozen=True)
class Verdict:
    """The result of checking a chain."""

    ok: bool
    checked: int
    first_bad_sequence: int = 0
    message: str = ""


class ChainVerifier:
    """Checks rows fed in sequence order; stops at the first that does not verify."""

    def __init__(self, anchor_sequence: int = 0, anchor_hash: bytes = GENESIS) -> None:
        self.anchor = (anchor_sequence, anchor_hash)
        self.last_sequence = anchor_sequence
        self.last_hash = anchor_hash
        self.checked = 0
        self.bad: Verdict | None = None
        #: The anchor named by the newest prune record seen, and that record's sequence.
        self.chained_anchor: tuple[int, str] | None = None
        self.chained_at = 0

    def feed(self, row: AuditRow) -> bool:
        """Check the next row; False once the chain is broken (see `bad`)."""
        if self.bad is not None:
            return False
        if row.sequence <= self.anchor[0]:
            # Pruning deletes every row up to the anchor in the transaction that moves it:
            # a row still here at or before it means the anchor was moved over it.
            return self._fail(row.sequence, f"record {row.sequence} is at or before the prune "
                                            f"anchor (record {self.anchor[0]}): the anchor "
                                            "was moved")
        expected = self.last_sequence + 1
        if row.sequence != expected:
            what = ("is missing" if row.sequence > expected
                    else f"is out of order (found {row.sequence} after {self.last_sequence})")
            return self._fail(expected, f"record {expected} {what}")
        if chain_hash(self.last_hash, row.sequence, row.entry) != row.hash:
            return self._fail(row.sequence, f"record {row.sequence} does not match its hash "
                                            "(changed, or a record before it was removed)")
        self.last_sequence, self.last_hash = row.sequence, row.hash
        self.checked += 1
        named = anchor_named_by(row.entry)
        if named is not None:
            self.chained_anchor, self.chained_at = named, row.sequence
        return True

    def finish(self, head_sequence: int, head_hash: bytes) -> Verdict:
        """The verdict, given the head the writers recorded (catches removed last rows)."""
        if self.bad is not None:
            return self.bad
        if head_sequence > self.last_sequence:
            return Verdict(False, self.checked, self.last_sequence + 1,
                           f"records {self.last_sequence + 1} to {head_sequence} are missing")
        if head_sequence != self.last_sequence or head_hash != self.last_hash:
            return Verdict(False, self.checked, head_sequence or self.last_sequence,
                           f"the chain head (record {head_sequence}) does not match the log")
        return self.check_anchor()

    def check_anchor(self) -> Verdict:
        """The anchor verification started from must be the one the newest prune chained.

        The anchor row sits outside the chain, so on its own it could be moved past a
        forged or deleted record; the prune record inside the chain says where it is.
        """
        seq, anchor_hash = self.anchor
        if self.chained_anchor is None:
            if seq == 0:
                return Verdict(True, self.checked)
            return Verdict(False, self.checked, seq,
                           f"the prune anchor (record {seq}) is named by no prune record in "
                           "the chain: the anchor was moved or the prune record removed")
        if self.chained_anchor != (seq, anchor_hash.hex()):
            return Verdict(False, self.checked, self.chained_at,
                           f"the prune anchor (record {seq}) is not the one prune record "
                           f"{self.chained_at} chained (record {self.chained_anchor[0]}): "
                           "the anchor was moved")
        return Verdict(True, self.checked)

    def _fail(self, sequence: int, message: str) -> bool:
        self.bad = Verdict(False, self.checked, sequence, message)
        return False


def verify(rows: Iterable[AuditRow], *, anchor_sequence: int = 0,
           anchor_hash: bytes = GENESIS, head: tuple[int, bytes] | None = None) -> Verdict:
    """Check a whole chain; `head` defaults to the last row seen."""
    v = ChainVerifier(anchor_sequence, anchor_hash)
    for row in rows:
        if not v.feed(row):
            break
    if head is None:
        head = (v.last_sequence, v.last_hash)
    return v.finish(*head)


def query_hash(request: Any) -> str:
    """SHA-256 (hex) of the normalised request: its deterministic wire encoding.

    Paging fields are cleared first, so every page of one query has the same hash. The
    request body itself is never stored, only this hash.
    """
    if not isinstance(request, Message):
        return ""
    fields = request.DESCRIPTOR.fields_by_name
    if any(f in fields and getattr(request, f) for f in PAGING_FIELDS):
        copy = type(request)()
        copy.CopyFrom(request)
        for f in PAGING_FIELDS:
            if f in fields:
                copy.ClearField(f)
        request = copy
    body = request.SerializeToString(deterministic=True)
    name = request.DESCRIPTOR.full_name.encode()
    # The type name keeps two different requests with the same bytes apart.
    return hashlib.sha256(name + b"\0" + body).hexdigest()


def kind_of(request: Any) -> str:
    """The resource kind a request names (key.kind, kind, put_resource.resource.kind...)."""
    if not isinstance(request, Message):
        return ""
    for path in _KIND_PATHS:
        value: Any = request
        for part in path:
            if not isinstance(value, Message) or part not in value.DESCRIPTOR.fields_by_name:
                value = None
                break
            value = getattr(value, part)
        if isinstance(value, str) and value:
            return value
    return ""


def entry_from_row(row: Mapping[str, Any]) -> AuditEntry:
    """An entry from a database row (see the audit_log table)."""
    return AuditEntry(
        time=row["time"], identity=row["identity"], peer=row["peer"], grant=row["grant_name"],
        service=row["service"], method=row["method"], kind=row["kind"],
        query_hash=row["query_hash"], outcome=row["outcome"],
        status_code=row["status_code"], bytes_out=int(row["bytes_out"]),
        latency_us=int(row["latency_us"]), trace_id=row["trace_id"], reason=row["reason"],
        # NULL (or no column) is a row from before details; any other value is hashed as
        # stored, so [], false or a list of pairs written over `{}` do not verify.
        detail={} if row.get("detail") is None else row["detail"],
    )
