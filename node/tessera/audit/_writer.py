"""The group-committing audit writer: no call is answered before its row is durable."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable

import grpc
import psycopg
import psycopg_pool
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tessera.audit._chain import AuditEntry, kind_of, outcome_of, payload, query_hash
from tessera.audit._store import append
from tessera.calls import CallOutcome
from tessera.core.errors import Unavailable
from tessera.store import Pool

log = logging.getLogger(__name__)

#: Most rows committed in one transaction.
MAX_BATCH = 512
#: Seconds a batch waits for a pooled connection before its calls fail UNAVAILABLE.
CONNECTION_TIMEOUT_S = 5.0
#: Seconds between checks for records committed with effects but not linked yet (left by a
#: replica that stopped before linking them); a finished effect asks for a link at once.
LINK_INTERVAL_S = 5.0


class _Pending:
    """The record of one call in progress, for an effect's transaction to commit with."""

    __slots__ = ("_outcome", "_writer", "is_committed")

    def __init__(self, outcome: Callable[[], CallOutcome], writer: AuditWriter) -> None:
        self._outcome = outcome
        self._writer = writer
        self.is_committed = False

    def payload(self) -> bytes:
        """The record as the call stands now: succeeded so far, latency until now."""
        return payload(entry_of(self._outcome()))

    def committed(self) -> None:
        """The effect and this record committed: link it into the chain soon."""
        self.is_committed = True
        self._writer.link_soon()


def entry_of(outcome: CallOutcome, now: dt.datetime | None = None) -> AuditEntry:
    """The audit fields of one finished call."""
    caller = outcome.caller
    grant = getattr(caller, "grant", None)
    grant_name = grant if isinstance(grant, str) else str(getattr(grant, "name", "") or "")
    return AuditEntry(
        time=(now or dt.datetime.now(dt.UTC)),
        identity=caller.uri if caller is not None else "",
        peer=caller.peer if caller is not None else "",
        grant=grant_name,
        # Caller-chosen for unknown methods (they are audited too).
        service=_clean(outcome.service, 200),
        method=_clean(outcome.method, 200),
        kind=_clean(kind_of(outcome.request)),
        query_hash=query_hash(outcome.request),
        outcome=_OUTCOMES[outcome.code],
        status_code=_CODE_NAMES[outcome.code],
        bytes_out=int(outcome.response_bytes),
        latency_us=round(outcome.latency_s * 1_000_000),
        trace_id=_clean(outcome.trace_id),
        reason=_stream_reason(outcome),
    )


#: Each code's audit outcome and name (an enum member's .value and .name are slow to read).
_OUTCOMES = {code: outcome_of(code).value for code in grpc.StatusCode}
_CODE_NAMES = {code: code.name for code in grpc.StatusCode}


def _stream_reason(outcome: CallOutcome) -> str:
    """A stream's close row says how many messages it delivered, after any reason."""
    if outcome.messages_out is None:
        return outcome.reason
    return f"{outcome.reason or 'STREAM_CLOSED'} delivered={outcome.messages_out}"


def _clean(text: str, limit: int = 128) -> str:
    """Caller-chosen text made storable: PostgreSQL refuses NUL, and a row stays small."""
    if len(text) > limit:
        text = text[:limit]
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


class _Metrics:
    """The writer's metrics, in the node's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lag = Histogram(
            "tessera_audit_lag_seconds",
            "Time from a call's end until its audit row has committed.",
            registry=registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
        )
        self.batch = Histogram(
            "tessera_audit_batch_rows", "Audit rows committed per transaction.",
            registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )
        self.failures = Counter(
            "tessera_audit_write_failures_total",
            "Audit batches that could not be written (their calls answered UNAVAILABLE).",
            registry=registry,
        )
        self.queue = Gauge(
            "tessera_audit_queue_rows",
            "Audit rows waiting to be committed (their calls are not answered yet).",
            registry=registry,
        )


class AuditWriter:
    """An `Auditor`: `record()` queues the row and returns after its batch has committed.

    One task drains the queue, one transaction per batch. A batch is whatever queued while
    the previous one was committing (plus `batch_delay_s` when calls are finishing
    concurrently), so a lone call pays one commit and a busy node shares each commit among
    many calls.
    """

    def __init__(self, pool: Pool, *, registry: CollectorRegistry | None = None,
                 max_batch: int = MAX_BATCH, batch_delay_s: float = 0.0,
                 connection_timeout_s: float = CONNECTION_TIMEOUT_S) -> None:
        self._pool = pool
        self._connection_timeout_s = connection_timeout_s
        self._max_batch = max_batch
        self._batch_delay_s = batch_delay_s
        self._last_batch = 0
        self._queue: list[tuple[bytes, float, asyncio.Future[int]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._closing = False
        # A previous run may have left records unlinked: the first batch, the first effect
        # or the first tick (LINK_INTERVAL_S) links them.
        self._link_due = True
        self._metrics = _Metrics(registry) if registry is not None else None
        if self._metrics is not None:
            self._metrics.queue.set_function(lambda: len(self._queue))

    def start(self) -> None:
        """Start the writer task."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="tessera-audit-writer")
            self._ticker = asyncio.create_task(self._tick(), name="tessera-audit-linker")

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(LINK_INTERVAL_S)
            self.link_soon()

    async def record(self, outcome: CallOutcome) -> int:
        """Queue the call's row; return its sequence once durable, else raise Unavailable."""
        return await self._append(entry_of(outcome))

    async def record_entry(self, entry: AuditEntry) -> None:
        """Queue a prepared row (an aggregate, say); return once it is durable."""
        await self._append(entry)

    async def _append(self, entry: AuditEntry) -> int:
        """Queue a row; its sequence once its batch has committed."""
        if self._closing or self._task is None or self._task.done():
            raise Unavailable("the audit log is not accepting records (the node is stopping); "
                              "retry on another replica")
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append((payload(entry), time.perf_counter(), fut))
        self._wake.set()
        # If the call is cancelled while it waits, its row stays queued and is written all
        # the same; only the (cancelled) future is skipped.
        return await fut

    def intent(self, outcome: Callable[[], CallOutcome]) -> _Pending:
        """A record the call's effect can commit with (see `tessera.store.effect_transaction`)."""
        return _Pending(outcome, self)

    def link_soon(self) -> None:
        """Chain the records committed with effects at the next batch (no waiting caller)."""
        self._link_due = True
        self._wake.set()

    async def close(self) -> None:
        """Write what is queued, then stop; later records fail UNAVAILABLE."""
        self._closing = True
        self._wake.set()
        if self._ticker is not None:
            self._ticker.cancel()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._link_due and not self._queue:
                # Every batch links too; this is for effects when no reads are queued.
                await self._commit([])
            while self._queue:
                if self._batch_delay_s and self._last_batch > 1 and \
                        len(self._queue) < self._max_batch:
                    # Calls are finishing concurrently: let more join this commit. A lone
                    # call (the last batch held one row) never waits.
                    await asyncio.sleep(self._batch_delay_s)
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._commit(batch)
            if self._closing:
                return

    async def _commit(self, batch: list[tuple[bytes, float, asyncio.Future[int]]]) -> None:
        error: BaseException | None = None
        self._link_due = False
        last = 0
        try:
            async with self._pool.connection(timeout=self._connection_timeout_s) as conn:
                last = await append(conn, [p for p, _, _ in batch])
        except (psycopg.Error, psycopg_pool.PoolTimeout, OSError) as exc:
            log.error("audit batch of %d rows not written: %s", len(batch), type(exc).__name__)
            error = exc
        except Exception as exc:  # never let the writer task die with calls waiting
            log.exception("audit batch of %d rows not written", len(batch))
            error = exc
        done = time.perf_counter()
        m = self._metrics
        if error is not None:
            self._link_due = True
            if m is not None:
                m.failures.inc()
            failure = Unavailable("the audit log could not be written, so the call was not "
                                  "answered; retry")
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(failure)
            return
        if not batch:
            return
        self._last_batch = len(batch)
        if m is not None:
            m.batch.observe(len(batch))
        first = last - len(batch) + 1  # the batch's rows are chained in queue order
        for i, (_, queued, fut) in enumerate(batch):
            if m is not None:
                m.lag.observe(done - queued)
            if not fut.done():
                fut.set_result(first + i)
