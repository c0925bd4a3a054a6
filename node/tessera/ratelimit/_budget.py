"""Row budgets: how many rows one grant may read within a rolling window, on every replica.

The row cap bounds one page; a peer could still read every row in scope page by page. A
grant's budget bounds the rows served under it within any `window_s` seconds, counted in
Valkey so every replica shares one count. Each read first *reserves* up to the rows it
may serve (so concurrent reads on several replicas can never overshoot together), then
*settles* with the rows it actually served (returning the rest).

The window is exact: each reservation is a member of a sorted set scored by the server's
TIME in milliseconds, and a running sum is kept beside it; members that left the window
are subtracted as they are trimmed, so each step is O(log n). When Valkey does not answer,
`on_valkey_failure` decides: "local" keeps a per-replica ledger with the same rules,
"closed" refuses (UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from tessera.core.errors import ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

# KEYS[1]: sorted set of reservations ("<id>:<rows>", score = ms); KEYS[2]: the rows in it.
# ARGV: window_ms, budget, want, id.  Returns {granted, retry_ms}.
_RESERVE = """
local window = tonumber(ARGV[1])
local budget = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cutoff = now - window
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff)
for _, m in ipairs(old) do
  used = used - tonumber(string.match(m, ':(%d+)$'))
end
if #old > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff) end
if used < 0 or redis.call('ZCARD', KEYS[1]) == 0 then used = 0 end
local granted = math.min(want, budget - used)
if granted <= 0 then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local retry = window
  if #first > 0 then retry = tonumber(first[2]) + window - now + 1 end
  redis.call('SET', KEYS[2], string.format('%d', used), 'PX', window)
  redis.call('PEXPIRE', KEYS[1], window)
  return {0, retry}
end
redis.call('ZADD', KEYS[1], now, ARGV[4] .. ':' .. string.format('%d', granted))
redis.call('SET', KEYS[2], string.format('%d', used + granted), 'PX', window)
redis.call('PEXPIRE', KEYS[1], window)
return {granted, 0}
"""

# KEYS as above; ARGV: member ("<id>:<granted>"), rows served. Gives back what was unused.
_SETTLE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
local id, granted = string.match(ARGV[1], '^(.*):(%d+)$')
granted = tonumber(granted)
local served = tonumber(ARGV[2])
if served >= granted then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
if served > 0 then
  redis.call('ZADD', KEYS[1], score, id .. ':' .. string.format('%d', served))
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('DECRBY', KEYS[2], granted - served)
end
return granted - served
"""


@dataclass(frozen=True)
class Reservation:
    """Rows one read may serve; settle it with the rows actually served."""

    grant: str
    granted: int
    member: str = ""
    #: Where it was reserved: "valkey", "local", or "" for a grant with no budget.
    backend: str = ""


@dataclass
class _Ledger:
    """One grant's reservations in the per-replica fallback: (time, id, rows)."""

    entries: deque[list[Any]] = field(default_factory=deque)
    used: int = 0


class LocalBudgets:
    """The same rolling-window rules in process memory (fallback, and for unit tests)."""

    def __init__(self) -> None:
        self._ledgers: dict[str, _Ledger] = {}

    def reserve(self, grant: str, budget: int, window_s: float, want: int,
                now: float) -> tuple[int, float, str]:
        """(granted, retry_after_s, member id)."""
        ledger = self._ledgers.setdefault(grant, _Ledger())
        while ledger.entries and ledger.entries[0][0] <= now - window_s:
            ledger.used -= ledger.entries.popleft()[2]
        granted = min(want, budget - ledger.used)
        if granted <= 0:
            first = ledger.entries[0][0] if ledger.entries else now
            return 0, max(first + window_s - now, 0.001), ""
        member = uuid.uuid4().hex
        ledger.entries.append([now, member, granted])
        ledger.used += granted
        return granted, 0.0, member

    def settle(self, grant: str, member: str, served: int) -> None:
        """Give back what a reservation did not serve."""
        ledger = self._ledgers.get(grant)
        if ledger is None:
            return
        for entry in ledger.entries:
            if entry[1] == member:
                unused = max(entry[2] - served, 0)
                entry[2] -= unused
                ledger.used -= unused
                return


class RowBudgets:
    """Reserves and settles rows against grants' budgets, in Valkey (see module doc)."""

    def __init__(self, valkey: redis.Redis, *, key_prefix: str, timeout_s: float = 0.2,
                 on_valkey_failure: str = "local", processes: int = 1) -> None:
        self.valkey = valkey
        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self.on_valkey_failure = on_valkey_failure
        self.processes = processes
        self.local = LocalBudgets()
        self._reserve = valkey.register_script(_RESERVE)
        self._settle = valkey.register_script(_SETTLE)

    def _keys(self, grant: str) -> list[str]:
        tag = f"{{{self.key_prefix}:{grant}}}"  # one hash slot for both keys
        return [f"{tag}:rows", f"{tag}:sum"]

    async def reserve(self, grant: str, budget: int, window_s: int, want: int) -> Reservation:
        """Up to `want` rows under `grant`; RESOURCE_EXHAUSTED (with RetryInfo) if none."""
        if budget <= 0 or want <= 0:
            return Reservation(grant, want)
        member = uuid.uuid4().hex
        try:
            async with asyncio.timeout(self.timeout_s):
                granted, retry_ms = await self._reserve(
                    keys=self._keys(grant), args=[int(window_s * 1000), budget, want, member])
            backend, retry_s = "valkey", int(retry_ms) / 1000
            member = f"{member}:{int(granted)}"
        except (RedisError, OSError, TimeoutError) as exc:
            if self.on_valkey_failure == "closed":
                raise Unavailable("the row budget cannot be checked (Valkey does not "
                                  "answer); retry") from None
            log.warning("row budget of %s checked locally: Valkey failed (%s)", grant,
                        type(exc).__name__)
            # Each of the node's serving processes spends its share of the budget.
            share = max(1, budget // self.processes)
            granted, retry_s, member = self.local.reserve(grant, share, window_s, want,
                                                          time.monotonic())
            backend = "local"
        if int(granted) <= 0:
            raise ResourceExhausted(
                f"the grant's row budget ({budget} rows per {window_s} s) is spent; retry "
                "later", retry_after_s=max(retry_s, 0.001), subject=grant)
        return Reservation(grant, int(granted), member, backend)

    async def settle(self, reservation: Reservation, served: int) -> None:
        """Return the rows a reservation did not serve (best effort: over-counting only)."""
        if not reservation.backend or served >= reservation.granted:
            return
        if reservation.backend == "local":
            self.local.settle(reservation.grant, reservation.member, served)
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._settle(keys=self._keys(reservation.grant),
                                   args=[reservation.member, served])
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("unused rows of %s not returned to its budget (%s)",
                        reservation.grant, type(exc).__name__)
