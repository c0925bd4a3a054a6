"""The GCRA step as one atomic Valkey Lua script, run by EVALSHA with a load fallback."""

from __future__ import annotations

import asyncio
import functools
import hashlib
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

# KEYS[1]: the TAT of one (subject, method class).
# KEYS[2]: prefix of the subject's rejection keys (same hash tag, so the same slot).
# ARGV: interval_us, tolerance_us, rejection_ttl_s, method_class, [now_us], [cost].
# cost > 1 asks for a lease of that many admissions at once (all or, failing that, one:
# a refusal is then exactly the one-call refusal, with its retry-after); the reply's 4th
# element says how many were granted. A negative cost gives back a lease's unused rest.
# The clock is the server's TIME, so replicas with skewed clocks share one timeline.
# Numbers are written with %d: Lua's default number format keeps only 14 digits, fewer
# than a microsecond timestamp has. An explicit now_us (tests, replays) keeps the state
# for a minute, as wall time between simulated steps says nothing about the simulation.
LUA = """
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local now
local explicit = ARGV[5] ~= nil and ARGV[5] ~= ''
if explicit then
  now = tonumber(ARGV[5])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local cost = tonumber(ARGV[6] or '1') or 1
local tat = now
local stored = redis.call('GET', KEYS[1])
if stored then
  tat = tonumber(stored)
  if tat < now then tat = now end
end
local new_tat = tat + interval * cost
local allow_at = new_tat - tolerance
if allow_at > now and cost > 1 then
  cost = 1
  new_tat = tat + interval
  allow_at = new_tat - tolerance
end
if allow_at > now then
  local bucket = KEYS[2] .. ':' .. string.format('%d', math.floor(now / 60000000))
  redis.call('HINCRBY', bucket, ARGV[4], 1)
  redis.call('EXPIRE', bucket, ARGV[3])
  local last = KEYS[2] .. ':last'
  redis.call('HSET', last, ARGV[4], string.format('%d', now))
  redis.call('EXPIRE', last, ARGV[3])
  return {0, allow_at - now, now, 0}
end
local ttl = math.ceil((new_tat - now) / 1000)
if explicit then ttl = 60000 end
if ttl < 1 then ttl = 1 end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', ttl)
return {1, 0, now, cost}
"""

SHA1 = hashlib.sha1(LUA.encode(), usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class ScriptResult:
    """What the script answered."""

    allowed: bool
    retry_after_us: int
    #: The server's clock at the decision, in microseconds since 1970.
    now_us: int
    #: Admissions granted (more than one for a lease; 0 when refused).
    granted: int = 1


@functools.lru_cache(maxsize=4096)
def keys_for(prefix: str, subject: str, method_class: str) -> tuple[str, str]:
    """The TAT key and rejection-key prefix of a subject; the hash tag keeps them together."""
    tag = "{" + subject + "}"
    return f"{prefix}:{tag}:{method_class}", f"{prefix}:{tag}:rej"


#: (tat_key, rej_prefix, method_class, interval_us, tolerance_us, rejection_ttl_s[, cost])
Args = tuple[str, str, str, int, int, int] | tuple[str, str, str, int, int, int, int]


def _result(reply: Any) -> ScriptResult:
    allowed = bool(int(reply[0]))
    granted = int(reply[3]) if len(reply) > 3 else int(allowed)
    return ScriptResult(allowed, int(reply[1]), int(reply[2]), granted)


def _cost(args: Args) -> int:
    return args[6] if len(args) > 6 else 1


async def run(valkey: redis.Redis, tat_key: str, rej_prefix: str, method_class: str,
              interval_us: int, tolerance_us: int, rejection_ttl_s: int,
              now_us: int | None = None, *, cost: int = 1) -> ScriptResult:
    """One decision: EVALSHA, loading the script when the server does not know it."""
    args: list[str | int] = [interval_us, tolerance_us, rejection_ttl_s, method_class]
    if now_us is not None or cost != 1:
        args.append("" if now_us is None else now_us)
    if cost != 1:
        args.append(cost)
    try:
        reply = await valkey.evalsha(SHA1, 2, tat_key, rej_prefix, *args)
    except NoScriptError:
        # A restarted or flushed server has forgotten it; load once and retry.
        await valkey.script_load(LUA)
        reply = await valkey.evalsha(SHA1, 2, tat_key, rej_prefix, *args)
    return _result(reply)


async def run_many(valkey: redis.Redis, batch: list[Args]) -> list[ScriptResult | BaseException]:
    """Several decisions in one round trip (a pipeline of EVALSHA, not a transaction).

    Each script still runs atomically on its own; only the network trip is shared.
    """
    replies: list[Any] = [None] * len(batch)
    todo = list(range(len(batch)))
    for attempt in range(2):
        async with valkey.pipeline(transaction=False) as pipe:
            for i in todo:
                k1, k2, klass, interval, tolerance, ttl = batch[i][:6]
                pipe.evalsha(SHA1, 2, k1, k2, interval, tolerance, ttl, klass, "",
                             _cost(batch[i]))
            answers = await pipe.execute(raise_on_error=False)
        missing = []
        for i, answer in zip(todo, answers, strict=True):
            if isinstance(answer, NoScriptError) and attempt == 0:
                missing.append(i)  # not run at all: safe to run again
            else:
                replies[i] = answer
        if not missing:
            break
        await valkey.script_load(LUA)
        todo = missing
    return [r if isinstance(r, BaseException) else _result(r) for r in replies]


def _pack(args: Args) -> bytes:
    """EVALSHA of one decision as RESP bytes."""
    k1, k2, klass, interval, tolerance, ttl = args[:6]
    out = [_EVALSHA_PREFIX]
    for a in (k1, k2, str(interval), str(tolerance), str(ttl), klass, "", str(_cost(args))):
        b = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


_EVALSHA_PREFIX = b"*11\r\n$7\r\nEVALSHA\r\n$40\r\n" + SHA1.encode() + b"\r\n$1\r\n2\r\n"


class Line:
    """One connection of its own for decisions: pre-packed commands, replies read in order.

    The client's general command path (pool lock, retries, per-command encoding) costs more
    than the decision itself; this skips it. Any error or cancellation drops the connection,
    as its replies can no longer be matched to requests; the next use reconnects.
    """

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.busy = False

    @classmethod
    def of(cls, valkey: redis.Redis) -> Line | None:
        """A line with the client's connection settings; None for clients without a pool."""
        pool: Any = getattr(valkey, "connection_pool", None)
        make = getattr(pool, "connection_class", None)
        if make is None:
            return None
        # No per-socket timeouts (one timer task per write): a use lasts only as long as a
        # decision waits for it, and the waiting caller bounds that (see Batcher).
        return cls(make(**{**pool.connection_kwargs, "socket_timeout": None}))

    async def call(self, batch: list[Args]) -> list[ScriptResult]:
        """Run the decisions; raises NoScriptError (nothing ran) or a connection error.

        Unbounded by itself: cancel it to give up (which drops the connection).
        """
        self.busy = True
        try:
            await self._conn.send_packed_command(b"".join(_pack(a) for a in batch),
                                                 check_health=False)
            return [_result(await self._conn.read_response()) for _ in batch]
        except BaseException:
            await self._conn.disconnect(nowait=True)
            raise
        finally:
            self.busy = False

    async def close(self) -> None:
        """Close the connection."""
        await self._conn.disconnect(nowait=True)


class Batcher:
    """Coalesces concurrent decisions into pipelines, one round trip in flight at a time.

    Under concurrency most of a decision's cost is the client's per-command overhead, not
    Valkey. While one round trip is out, new decisions wait for it and then leave together
    (like Nagle's algorithm); an idle limiter sends a lone decision at once, inline, as a
    plain EVALSHA. A round trip older than `stall_s` no longer holds the others back, so a
    hung connection cannot stall every call behind it.

    The batcher has no timer of its own: the caller of `decide` owns the timeout (the
    limiter's `decision_timeout_ms`) and gives up by cancelling. A lone decision's round trip
    is cancelled with it; a batch's is cancelled once every decision in it has given up.
    Either way the connection is dropped, so nothing stays parked on a server that does not
    answer.
    """

    def __init__(self, valkey: redis.Redis, *, stall_s: float) -> None:
        self.valkey = valkey
        self.stall_s = stall_s
        self._pending: list[tuple[Args, asyncio.Future[ScriptResult]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._scheduled = False
        self._inflight = 0
        self._busy_since = 0.0
        self._line = Line.of(valkey)

    def _blocked(self, now: float) -> bool:
        return self._inflight > 0 and now - self._busy_since <= self.stall_s

    async def decide(self, args: Args) -> ScriptResult:
        """One decision, at once if nothing is in flight, else in the next batch."""
        loop = asyncio.get_running_loop()
        if not self._pending and not self._blocked(loop.time()):
            self._started(loop)
            try:
                result = (await self._run([args]))[0]
            finally:
                self._finished(loop)
            if isinstance(result, BaseException):
                raise result
            return result
        fut: asyncio.Future[ScriptResult] = loop.create_future()
        self._pending.append((args, fut))
        self._schedule(loop)
        return await fut

    def _started(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._inflight == 0:
            self._busy_since = loop.time()
        self._inflight += 1

    def _finished(self, loop: asyncio.AbstractEventLoop) -> None:
        self._inflight -= 1
        self._schedule(loop)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._pending and not self._scheduled and not self._blocked(loop.time()):
            self._scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        loop = asyncio.get_running_loop()
        # Decisions whose callers already gave up are not sent at all.
        batch = [(args, fut) for args, fut in self._pending if not fut.done()]
        self._pending = []
        if not batch:
            return
        self._started(loop)
        task = loop.create_task(self._send(batch))
        self._tasks.add(task)  # keep a reference until done
        task.add_done_callback(self._tasks.discard)
        waiting = len(batch)

        def gave_up(fut: asyncio.Future[ScriptResult]) -> None:
            nonlocal waiting
            if fut.cancelled():  # its caller timed out and decided without us
                waiting -= 1
                if waiting == 0 and not task.done():
                    task.cancel()  # nobody waits for the answer any more

        for _, fut in batch:
            fut.add_done_callback(gave_up)

    async def _send(self, batch: list[tuple[Args, asyncio.Future[ScriptResult]]]) -> None:
        results: list[ScriptResult | BaseException]
        try:
            results = list(await self._run([args for args, _ in batch]))
        except Exception as exc:  # every waiter learns that Valkey failed
            results = [exc] * len(batch)
        finally:
            self._finished(asyncio.get_running_loop())
        for (_, fut), result in zip(batch, results, strict=True):
            if fut.done():  # the caller timed out and decided without us
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    async def _run(self, batch: list[Args]) -> list[ScriptResult | BaseException]:
        """On the own line when it is free, else through the client's pool."""
        if self._line is not None and not self._line.busy:
            try:
                return list(await self._line.call(batch))
            except NoScriptError:
                # Nothing in the batch ran; a restarted server forgot the script.
                await self.valkey.script_load(LUA)
            except RedisConnectionError:
                # Once, on a fresh connection: the old one may have died while idle (a
                # restarted server). If the batch did run, it is counted twice, which
                # only errs on the strict side.
                pass
            return list(await self._line.call(batch))
        if len(batch) == 1:
            one = batch[0]
            return [await run(self.valkey, *one[:6], cost=_cost(one))]
        return await run_many(self.valkey, batch)

    async def close(self) -> None:
        """Wait for batches in flight, then close the line."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._line is not None:
            await self._line.close()
