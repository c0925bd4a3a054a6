"""The enrolment listener's aggregating auditor (issue 12.2), with a recording writer."""

from __future__ import annotations

import grpc

from tessera.api._enrolment import _UNVERIFIED, MAX_SOURCES_PER_WINDOW, EnrolmentAuditor
from tessera.audit import AuditEntry
from tessera.calls import CallOutcome


class Recorder:
    """Stands in for the AuditWriter: keeps what it is given."""

    def __init__(self) -> None:
        self.calls: list[CallOutcome] = []
        self.entries: list[AuditEntry] = []

    async def record(self, outcome: CallOutcome) -> None:
        self.calls.append(outcome)

    async def record_entry(self, entry: AuditEntry) -> None:
        self.entries.append(entry)


def outcome(code: grpc.StatusCode, reason: str) -> CallOutcome:
    return CallOutcome(None, "tessera.v1.AdminService", "EnrollPeer", code, reason, None, 0,
                       0.001, "")


async def test_unverified_attempts_become_one_row_per_source_and_sources_are_capped() -> None:
    inner = Recorder()
    auditor = EnrolmentAuditor(inner, window_s=3600)
    await auditor.record(outcome(grpc.StatusCode.OK, ""))  # verified: passed on at once
    sources = [f"10.0.{i // 256}.{i % 256}/32" for i in range(MAX_SOURCES_PER_WINDOW + 6)]
    for source in sources:
        for code, reason in ((grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID"),
                             (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")):
            token = _UNVERIFIED.set(source)
            try:
                await auditor.record(outcome(code, reason))
            finally:
                _UNVERIFIED.reset(token)
    assert len(inner.calls) == 1 and inner.entries == []
    await auditor.close()
    rows = {e.detail["source"]: e for e in inner.entries}
    assert len(rows) == MAX_SOURCES_PER_WINDOW + 1
    assert rows["10.0.0.0/32"].detail["count"] == 2
    assert rows["10.0.0.0/32"].detail["reasons"] == {"TOKEN_INVALID": 1, "RATE_LIMITED": 1}
    assert rows["10.0.0.0/32"].outcome == "RATE_LIMITED"
    assert rows["other"].detail["count"] == 12  # the 6 sources past the cap, 2 each
    assert sum(e.detail["count"] for e in inner.entries) == 2 * len(sources)
