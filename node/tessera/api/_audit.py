"""AdminService's audit methods: ListAuditRecords and VerifyAudit (mixed into AdminServicer)."""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from tessera import audit
from tessera.api._convert import dict_to_struct, timestamp
from tessera.api._runtime import Runtime
from tessera.api._validate import Checker
from tessera.calls import current_caller
from tessera.core.errors import FieldViolation, InvalidArgument
from tessera.core.pagination import PageTokenError
from tessera.core.pagination import query_hash as filter_hash
from tessera_client.pb import admin_pb2

_OUTCOMES = {
    admin_pb2.AUDIT_OUTCOME_ALLOWED: audit.Outcome.ALLOWED,
    admin_pb2.AUDIT_OUTCOME_DENIED_BY_POLICY: audit.Outcome.DENIED_BY_POLICY,
    admin_pb2.AUDIT_OUTCOME_RATE_LIMITED: audit.Outcome.RATE_LIMITED,
    admin_pb2.AUDIT_OUTCOME_FAILED: audit.Outcome.FAILED,
}
_OUTCOME_PB = {v.value: k for k, v in _OUTCOMES.items()}


def record_to_pb(row: audit.AuditRow) -> admin_pb2.AuditRecord:
    """An audit row as the API's AuditRecord."""
    e = row.entry
    return admin_pb2.AuditRecord(
        sequence=row.sequence, time=timestamp(e.time), identity=e.identity, peer=e.peer,
        grant=e.grant, service=e.service, method=e.method, kind=e.kind,
        query_hash=e.query_hash,
        outcome=_OUTCOME_PB.get(e.outcome, admin_pb2.AUDIT_OUTCOME_UNSPECIFIED),
        status_code=e.status_code, bytes_out=e.bytes_out, latency_us=e.latency_us,
        trace_id=e.trace_id, reason=e.reason, hash=row.hash.hex(),
        # A tampered row's detail may be any JSON value; verification names that row.
        detail=dict_to_struct(dict(e.detail)) if isinstance(e.detail, Mapping) and e.detail
        else None,
    )


class AuditAdmin:
    """ListAuditRecords and VerifyAudit; AdminServicer inherits them."""

    rt: Runtime

    async def ListAuditRecords(
        self, request: admin_pb2.ListAuditRecordsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListAuditRecordsResponse:
        c = Checker()
        c.max_len("peer", request.peer, 200)
        c.max_len("grant", request.grant, 200)
        outcome = ""
        if request.outcome:
            if request.outcome not in _OUTCOMES:
                c.fail("outcome", f"unknown AuditOutcome {request.outcome}")
            else:
                outcome = _OUTCOMES[request.outcome].value
        page_size = c.page_size("page_size", request.page_size)
        start = c.timestamp("start_time", request.start_time, request.HasField("start_time"))
        end = c.timestamp("end_time", request.end_time, request.HasField("end_time"))
        if start is not None and end is not None and start > end:
            c.fail("end_time", "must not be before start_time")
        if request.after_sequence < 0:
            c.fail("after_sequence", "must be 0 or a record's sequence")
        c.done()
        f = audit.AuditFilter(peer=request.peer, grant=request.grant, outcome=outcome,
                              start=start, end=end)
        qhash = filter_hash({"peer": f.peer, "grant": f.grant, "outcome": f.outcome,
                             "start": start.isoformat() if start else None,
                             "end": end.isoformat() if end else None,
                             "newest_first": request.newest_first,
                             "after_sequence": request.after_sequence})
        caller = current_caller().uri
        after = request.after_sequence
        # Newest first pages downwards: the token holds the smallest sequence returned.
        before: int | None = None
        if request.page_token:
            try:
                position = self.rt.tokens.decode(request.page_token, query=qhash, caller=caller)
                if request.newest_first:
                    before = int(position[0])
                else:
                    after = int(position[0])
            except (PageTokenError, IndexError, TypeError, ValueError) as exc:
                raise InvalidArgument([FieldViolation("page_token", str(exc))]) from None
        rows = await audit.list_rows(self.rt.pool, f, after=after, limit=page_size + 1,
                                     newest_first=request.newest_first, before=before)
        token = ""
        if len(rows) > page_size:
            rows = rows[:page_size]
            token = self.rt.tokens.encode(query=qhash, caller=caller,
                                          position=[rows[-1].sequence])
        total = (await audit.count_rows(self.rt.pool, f, after=request.after_sequence)
                 if request.include_total_size else 0)
        return admin_pb2.ListAuditRecordsResponse(
            records=[record_to_pb(r) for r in rows], next_page_token=token, total_size=total)

    async def VerifyAudit(
        self, request: admin_pb2.VerifyAuditRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.VerifyAuditResponse:
        verdict = await audit.verify_log(self.rt.pool)
        return admin_pb2.VerifyAuditResponse(
            ok=verdict.ok, checked=verdict.checked,
            first_bad_sequence=verdict.first_bad_sequence, message=verdict.message)
