"""The node's rate limiter: GCRA in Valkey, shared by replicas, with a local fallback.

Every decision is one EVALSHA bounded by `decision_timeout_ms`. When Valkey fails or is
too slow the limiter switches, once, to an in-process GCRA per replica (or refuses calls,
with `on_valkey_failure = "closed"`), logs the transition once, and probes Valkey with
backoff in the background, so calls never wait on a server that is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from opentelemetry.trace import SpanKind
from redis.exceptions import RedisError

from tessera.calls import Caller
from tessera.config import METHOD_CLASSES, Limit, RateLimitConfig, parse_limits
from tessera.core import errors
from tessera.core.checks import Check, Level
from tessera.grants import Grant
from tessera.observability import Metrics, span
from tessera.ratelimit import _script
from tessera.ratelimit._gcra import MICROS, Decision, gcra
from tessera.ratelimit._policy import effective_limit, method_class, subject_of

log = logging.getLogger(__name__)

VALKEY, LOCAL, CLOSED = "valkey", "local", "closed"

#: Built-in defaults; `[ratelimit] local_limits / peer_limits` override them per class.
#: Local tools get generous limits; admin calls are not limited, so an operator can
#: always inspect an overloaded node.
DEFAULT_LOCAL = "read=1000/2000, search=200/400, command=500/1000, event=100/200, admin=0"
#: Peers whose grant carries no rate of its own.
DEFAULT_PEER = "read=50/100, search=10/20, command=20/40, event=5/10, admin=0"

#: Local fallback keys kept before expired ones are swept.
_LOCAL_SWEEP_AT = 50_000
#: Local rejection times kept per (subject, class) for the admin view.
_LOCAL_REJECTIONS_KEPT = 1_000
_PROBE_FIRST_S = 0.2
#: Timeouts for this long with no answer in between mean Valkey is unusable; shorter runs
#: are a busy event loop or a slow moment, and only the calls caught in them go local.
_TIMEOUTS_BEFORE_SWITCH_S = 1.0
#: A lease takes at most this share of a limit's budget over one second (burst + rate) from
#: Valkey in one decision, so replicas stay within a few percent of the shared limit.
LEASE_SHARE = 0.01
_ALLOWED = Decision(True, 0, 0)


def lease_size(limit: Limit) -> int:
    """Admissions one Valkey decision may take at once for `limit` (1: no leasing)."""
    return max(1, int(LEASE_SHARE * (limit.rate_per_s + limit.burst)))


class _Lease:
    """Admissions already charged in Valkey, spent by this replica without asking again.

    A lease lives only as long as the rate takes to earn it (n intervals), so an unused
    rest cannot turn into a later burst. The rest of an expired lease is given back to
    Valkey (a decision of negative cost) by the next call that finds it, so a caller well
    under its limit does not burn the budget on leases it cannot use.
    """

    __slots__ = ("expires", "limit", "remaining")

    def __init__(self, limit: Limit, remaining: int, expires: float) -> None:
        self.limit = limit
        self.remaining = remaining
        self.expires = expires


@dataclass(frozen=True)
class ClassStatus:
    """The effective limit of one method class and its recent rejections."""

    method_class: str
    limit: Limit
    #: "grant", "default_local" or "default_peer".
    source: str
    recent_rejections: int
    last_rejection: dt.datetime | None


@dataclass(frozen=True)
class LimitStatus:
    """What the admin view shows for one subject."""

    subject: str
    enabled: bool
    backend: str
    window_s: int
    classes: list[ClassStatus]


def share_of(limit: Limit, processes: int) -> Limit:
    """This process's share of a node-wide limit when `processes` decide it apart: the
    rate and the burst divided (a burst of at least one), so together they never admit
    more than the node's limit (beyond a burst smaller than `processes`)."""
    if processes <= 1 or limit.unlimited:
        return limit
    return Limit(limit.rate_per_s / processes, max(1, limit.burst // processes))


class LocalGcra:
    """The same GCRA in process memory, on this replica's monotonic clock.

    `processes` serving processes of one node (`--workers`) each decide their share.
    """

    def __init__(self, processes: int = 1) -> None:
        self.processes = processes
        self._tat: dict[str, int] = {}
        self._rejections: dict[tuple[str, str], deque[float]] = {}

    def decide(self, key: str, limit: Limit, now_us: int | None = None) -> Decision:
        """One decision for `key`."""
        now = time.monotonic_ns() // 1000 if now_us is None else now_us
        if len(self._tat) >= _LOCAL_SWEEP_AT:
            # Keys whose TAT has passed carry no state: a fresh key behaves the same.
            self._tat = {k: v for k, v in self._tat.items() if v > now}
        limit = share_of(limit, self.processes)
        d = gcra(self._tat.get(key), now, limit.interval_us, limit.tolerance_us)
        if d.allowed:
            self._tat[key] = d.tat_us
        return d

    def rejected(self, subject: str, klass: str) -> None:
        """Remember a rejection for the admin view."""
        times = self._rejections.setdefault((subject, klass), deque(maxlen=_LOCAL_REJECTIONS_KEPT))
        times.append(time.time())

    def recent(self, subject: str, klass: str, window_s: float) -> tuple[int, float | None]:
        """Rejections within the window and the time of the last one."""
        times = self._rejections.get((subject, klass)) or deque()
        since = time.time() - window_s
        count = sum(1 for t in times if t >= since)
        return count, (times[-1] if times and times[-1] >= since else None)

    def clear(self) -> None:
        """Forget limiter state (Valkey is authoritative again)."""
        self._tat.clear()


class RateLimiter:
    """Implements `tessera.calls.Limiter` for every admitted call."""

    def __init__(self, cfg: RateLimitConfig, valkey: redis.Redis, *, key_prefix: str,
                 metrics: Metrics | None = None, processes: int = 1) -> None:
        self.cfg = cfg
        self.valkey = valkey
        self.prefix = key_prefix
        self.metrics = metrics
        self.local_limits = parse_limits("default", DEFAULT_LOCAL) | parse_limits(
            "ratelimit.local_limits", cfg.local_limits)
        self.peer_limits = parse_limits("default", DEFAULT_PEER) | parse_limits(
            "ratelimit.peer_limits", cfg.peer_limits)
        # Valkey's limit is shared by every process; the fallback is split between them.
        self.local = LocalGcra(processes)
        self.backend = VALKEY
        self.last_error = ""
        self.down_since: dt.datetime | None = None
        self._timeout_s = cfg.decision_timeout_ms / 1000
        self._rejection_ttl_s = cfg.recent_window_s + 60
        self._probe: asyncio.Task[None] | None = None
        self._last_answer = time.monotonic()
        self._batcher = _script.Batcher(valkey, stall_s=self._timeout_s)
        self._counters: dict[tuple[str, str, bool], Any] = {}
        self._leases: dict[str, _Lease] = {}
        #: Keys with a lease request in flight, and its completion: concurrent misses wait
        #: for it instead of asking Valkey too (one lease at a time per key).
        self._leasing: dict[str, asyncio.Future[None]] = {}
        self._refunds: set[asyncio.Task[None]] = set()
        self._set_backend_gauge()

    def reconfigure(self, cfg: RateLimitConfig) -> None:
        """Apply a reloaded [ratelimit] section from the next decision on (the limits
        themselves, on/off, the fallback mode and the timeouts). Valkey's state (each
        subject's TAT) is kept: a lowered limit applies to what was already used."""
        self.cfg = cfg
        self.local_limits = parse_limits("default", DEFAULT_LOCAL) | parse_limits(
            "ratelimit.local_limits", cfg.local_limits)
        self.peer_limits = parse_limits("default", DEFAULT_PEER) | parse_limits(
            "ratelimit.peer_limits", cfg.peer_limits)
        self._timeout_s = cfg.decision_timeout_ms / 1000
        self._rejection_ttl_s = cfg.recent_window_s + 60
        self._batcher.stall_s = self._timeout_s
        if self.backend != VALKEY:  # Valkey is down: the fallback mode may have changed
            self.backend = LOCAL if cfg.on_valkey_failure == LOCAL else CLOSED
            self._set_backend_gauge()

    # -- the call path ----------------------------------------------------------------

    async def check(self, caller: Caller) -> None:
        """Raise ResourceExhausted when the caller is over the limit of this method class."""
        if not self.cfg.enabled:
            return
        klass = method_class(caller.service, caller.method)
        limit, _ = effective_limit(caller.grant, klass, self.local_limits, self.peer_limits)
        if limit.unlimited:
            return
        subject = subject_of(caller.uri, caller.grant)
        with span("ratelimit decide", SpanKind.INTERNAL,
                  **{"tessera.ratelimit.class": klass}) as current:
            decision = await self._decide(subject, klass, limit)
            if current is not None:
                current.set_attributes({"tessera.ratelimit.backend": self.backend,
                                        "tessera.ratelimit.allowed": decision.allowed})
        label = subject if caller.grant is not None else "local"
        if self.metrics is not None:
            self._counter(label, klass, decision.allowed).inc()
        if not decision.allowed:
            raise errors.ResourceExhausted(
                f"rate limit of {limit.rate_per_s:g} {klass} calls per second (burst "
                f"{limit.burst}) exceeded; retry in {decision.retry_after_s:.3f} s",
                retry_after_s=decision.retry_after_s, subject=f"{klass}:{subject}",
            )

    async def _decide(self, subject: str, klass: str, limit: Limit) -> Decision:
        tat_key, rej_prefix = _script.keys_for(self.prefix, subject, klass)
        if self.backend == VALKEY:
            if self._take(tat_key, rej_prefix, klass, limit):
                return _ALLOWED
            pending = self._leasing.get(tat_key)
            want = lease_size(limit)
            if pending is not None:
                # A lease for this key is on its way: wait for it rather than ask Valkey
                # too; if it brings nothing to spare, decide this call on its own.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(pending), self._timeout_s)
                if self.backend != VALKEY:  # Valkey failed meanwhile
                    return await self._decide(subject, klass, limit)
                if self._take(tat_key, rej_prefix, klass, limit):
                    return _ALLOWED
                want = 1
            lease_asked: asyncio.Future[None] | None = None
            if want > 1:
                lease_asked = asyncio.get_running_loop().create_future()
                self._leasing[tat_key] = lease_asked
            try:
                # The one bound on a decision: the batcher has no timer of its own, and
                # abandons a round trip once no decision waits for it.
                async with asyncio.timeout(self._timeout_s):
                    r = await self._batcher.decide((tat_key, rej_prefix, klass, limit.interval_us,
                                                    limit.tolerance_us, self._rejection_ttl_s,
                                                    want))
                self._last_answer = time.monotonic()
                if r.granted > 1 and self.backend == VALKEY:
                    # Earned at the rate in granted intervals: spend it within that time.
                    self._leases[tat_key] = _Lease(
                        limit, r.granted - 1,
                        self._last_answer + r.granted * limit.interval_us / MICROS)
                return Decision(r.allowed, r.retry_after_us, 0)
            except TimeoutError as exc:
                if time.monotonic() - self._last_answer >= _TIMEOUTS_BEFORE_SWITCH_S:
                    self._valkey_failed(exc)
                else:
                    return self._decide_locally(tat_key, subject, klass, limit)
            except (RedisError, OSError) as exc:
                self._valkey_failed(exc)
            finally:
                if lease_asked is not None:
                    del self._leasing[tat_key]
                    lease_asked.set_result(None)
        if self.backend == CLOSED:
            raise errors.Unavailable(
                "rate limiting is unavailable (Valkey does not answer) and the node is "
                "configured to refuse calls meanwhile; retry shortly",
                reason="RATE_LIMITER_UNAVAILABLE")
        return self._decide_locally(tat_key, subject, klass, limit)

    def _take(self, tat_key: str, rej_prefix: str, klass: str, limit: Limit) -> bool:
        """Admit one call from this key's lease, if it has one left and unexpired; an
        expired lease's rest is given back."""
        lease = self._leases.get(tat_key)
        if lease is None:
            return False
        if lease.remaining > 0 and lease.limit == limit and time.monotonic() < lease.expires:
            lease.remaining -= 1
            return True
        del self._leases[tat_key]
        if lease.remaining > 0:
            self._refund((tat_key, rej_prefix, klass, lease.limit.interval_us,
                          lease.limit.tolerance_us, self._rejection_ttl_s, -lease.remaining))
        return False

    def _refund(self, args: _script.Args) -> None:
        """Give an expired lease's unused admissions back, without holding up the call."""
        async def send() -> None:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(self._timeout_s):
                    await self._batcher.decide(args)

        task = asyncio.get_running_loop().create_task(send())
        self._refunds.add(task)
        task.add_done_callback(self._refunds.discard)

    def _decide_locally(self, key: str, subject: str, klass: str, limit: Limit) -> Decision:
        d = self.local.decide(key, limit)
        if not d.allowed:
            self.local.rejected(subject, klass)
        return d

    async def start(self) -> None:
        """Load the script before the first call, so no decision pays for it."""
        try:
            await asyncio.wait_for(self.valkey.script_load(_script.LUA),
                                   max(1.0, self._timeout_s))
        except (RedisError, OSError, TimeoutError) as exc:
            self._valkey_failed(exc)

    # -- backend switching ------------------------------------------------------------

    def _valkey_failed(self, exc: BaseException) -> None:
        """Switch away from Valkey once; the probe task brings it back."""
        if self.backend != VALKEY:
            return
        self.backend = LOCAL if self.cfg.on_valkey_failure == LOCAL else CLOSED
        self._leases.clear()
        self.last_error = _describe(exc, self._timeout_s)
        self.down_since = dt.datetime.now(dt.UTC)
        if self.backend == LOCAL:
            log.warning("rate limiting: Valkey %s; using the local limiter of this replica "
                        "until Valkey answers again", self.last_error)
        else:
            log.error("rate limiting: Valkey %s; refusing limited calls until Valkey "
                      "answers again (ratelimit.on_valkey_failure = closed)", self.last_error)
        self._set_backend_gauge()
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_back())

    async def _probe_until_back(self) -> None:
        """Probe with exponential backoff; loading the script also readies a restarted server."""
        delay = _PROBE_FIRST_S
        while True:
            await asyncio.sleep(delay)
            try:
                await asyncio.wait_for(self.valkey.script_load(_script.LUA),
                                       max(1.0, self._timeout_s))
            except (RedisError, OSError, TimeoutError):
                delay = min(delay * 2, self.cfg.probe_max_interval_s)
                continue
            break
        # Pooled connections from before the outage are dead; drop them so the next
        # decisions do not fail on them and switch straight back.
        with contextlib.suppress(RedisError, OSError):
            await self.valkey.connection_pool.disconnect()
        down_for = dt.datetime.now(dt.UTC) - (self.down_since or dt.datetime.now(dt.UTC))
        self.backend, self.last_error, self.down_since = VALKEY, "", None
        self._last_answer = time.monotonic()
        self.local.clear()
        self._set_backend_gauge()
        log.warning("rate limiting: Valkey answers again after %.1f s; limits are shared by "
                    "all replicas again", down_for.total_seconds())

    def _counter(self, label: str, klass: str, allowed: bool) -> Any:
        """The decisions counter child, cached: labels() takes a lock on every call."""
        key = (label, klass, allowed)
        child = self._counters.get(key)
        if child is None:
            assert self.metrics is not None
            child = self.metrics.ratelimit_decisions.labels(
                label, klass, "allowed" if allowed else "rejected")
            self._counters[key] = child
        return child

    def _set_backend_gauge(self) -> None:
        if self.metrics is None:
            return
        for name in (VALKEY, LOCAL):
            self.metrics.ratelimit_backend.labels(name).set(1 if self.backend == name else 0)

    async def close(self) -> None:
        """Stop the probe task and let decisions in flight finish."""
        if self._refunds:
            await asyncio.gather(*self._refunds, return_exceptions=True)
        await self._batcher.close()
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None

    # -- views ------------------------------------------------------------------------

    def doctor_check(self) -> Check:
        """The limiter's backend as a doctor check."""
        details: dict[str, Any] = {"backend": self.backend, "enabled": self.cfg.enabled}
        if not self.cfg.enabled:
            return Check("ratelimit", Level.YELLOW,
                                "rate limiting is disabled (ratelimit.enabled = false)", details)
        if self.backend == VALKEY:
            return Check("ratelimit", Level.GREEN,
                                "limits are decided in Valkey and shared by all replicas",
                                details)
        if self.down_since is not None:
            details["since"] = self.down_since.isoformat()
        if self.backend == LOCAL:
            return Check("ratelimit", Level.YELLOW,
                                f"Valkey {self.last_error}: limits are enforced per replica by "
                                "the local fallback until it answers; check valkey.url", details)
        return Check("ratelimit", Level.RED,
                            f"Valkey {self.last_error}: limited calls are refused "
                            "(ratelimit.on_valkey_failure = closed); check valkey.url", details)

    async def status(self, subject: str, grant: Grant | None = None) -> LimitStatus:
        """Effective limits of a grant or local identity and its recent rejections."""
        window = self.cfg.recent_window_s
        counts: dict[str, int] = {}
        last: dict[str, float] = {}
        if self.backend == VALKEY:
            try:
                counts, last = await asyncio.wait_for(
                    self._valkey_rejections(subject, window), max(1.0, self._timeout_s))
            except (RedisError, OSError, TimeoutError) as exc:
                self._valkey_failed(exc)
        classes = []
        for klass in METHOD_CLASSES:
            limit, source = effective_limit(grant, klass, self.local_limits, self.peer_limits)
            n_local, last_local = self.local.recent(subject, klass, window)
            when = max(last.get(klass, 0.0), last_local or 0.0)
            classes.append(ClassStatus(
                klass, limit, source, counts.get(klass, 0) + n_local,
                dt.datetime.fromtimestamp(when, dt.UTC) if when else None))
        return LimitStatus(subject, self.cfg.enabled, self.backend, window, classes)

    async def _valkey_rejections(
        self, subject: str, window_s: int
    ) -> tuple[dict[str, int], dict[str, float]]:
        """Sum the per-minute rejection buckets of the window (Valkey's clock)."""
        _, rej_prefix = _script.keys_for(self.prefix, subject, "")
        sec, usec = await self.valkey.time()
        now_us = int(sec) * MICROS + int(usec)
        first, latest = (now_us - window_s * MICROS) // (60 * MICROS), now_us // (60 * MICROS)
        async with self.valkey.pipeline(transaction=False) as pipe:
            for minute in range(first, latest + 1):
                pipe.hgetall(f"{rej_prefix}:{minute}")
            pipe.hgetall(f"{rej_prefix}:last")
            replies = await pipe.execute()
        counts: dict[str, int] = {}
        for bucket in replies[:-1]:
            for k, v in _decoded(bucket).items():
                counts[k] = counts.get(k, 0) + int(v)
        since_us = now_us - window_s * MICROS
        last = {k: int(v) / MICROS for k, v in _decoded(replies[-1]).items()
                if int(v) >= since_us}
        return counts, last


def _decoded(h: Mapping[Any, Any]) -> dict[str, str]:
    return {(k.decode() if isinstance(k, bytes) else str(k)):
            (v.decode() if isinstance(v, bytes) else str(v)) for k, v in h.items()}


def _describe(exc: BaseException, timeout_s: float) -> str:
    """A short, credential-free description of why Valkey failed."""
    if isinstance(exc, TimeoutError):
        return f"did not answer within {timeout_s * 1000:.0f} ms"
    return f"is unreachable ({type(exc).__name__})"
