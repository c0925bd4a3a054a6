"""The limiter's backend switching, against a stand-in Valkey that fails on command."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as redis
from prometheus_client import CollectorRegistry
from redis.exceptions import ConnectionError as RedisConnectionError

from tessera import config
from tessera.calls import Caller
from tessera.config import RateLimitConfig
from tessera.core import errors
from tessera.observability import Metrics
from tessera.pki import IdentityKind, SpiffeId
from tessera.ratelimit import Limit, LocalGcra, RateLimiter, share_of
from tessera.ratelimit import _script as script
from tests.fixtures.waiting import wait_until

CALLER = Caller(SpiffeId("tessera.local", IdentityKind.CLIENT, "local"), 1, "", "r",
                "tessera.v1.QueryService", "Describe")


class FlakyValkey:
    """Admits everything while healthy; refuses connections or stalls when told to."""

    def __init__(self) -> None:
        self.down = False
        self.stall_s = 0.0
        self.calls = 0

    async def evalsha(self, *args: Any) -> list[int]:
        self.calls += 1
        if self.down:
            raise RedisConnectionError("refused")
        if self.stall_s:
            await asyncio.sleep(self.stall_s)
        return [1, 0, 0]

    async def script_load(self, script: str) -> str:
        if self.down:
            raise RedisConnectionError("refused")
        return "sha"

    @property
    def connection_pool(self) -> Any:
        return self

    async def disconnect(self) -> None:
        return None


def limiter(vk: FlakyValkey, **cfg: Any) -> tuple[RateLimiter, Metrics]:
    metrics = Metrics(CollectorRegistry())
    settings = {"local_limits": "read=10/3", "probe_max_interval_s": 0.2, **cfg}
    return RateLimiter(RateLimitConfig(**settings), vk, key_prefix="t", metrics=metrics), metrics


def backend(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value("tessera_ratelimit_backend", {"backend": name})


async def test_an_unreachable_valkey_switches_once_to_local_limits_and_back(
        caplog: pytest.LogCaptureFixture) -> None:
    vk = FlakyValkey()
    rl, metrics = limiter(vk)
    caplog.set_level(logging.WARNING, "tessera.ratelimit")
    await rl.check(CALLER)
    vk.down = True
    outcomes = []
    for _ in range(5):
        try:
            await rl.check(CALLER)
            outcomes.append("ok")
        except errors.ResourceExhausted:
            outcomes.append("limited")
    # The local limiter starts fresh: burst 3, then refusals; nothing fails otherwise.
    assert outcomes == ["ok", "ok", "ok", "limited", "limited"]
    assert (backend(metrics, "local"), backend(metrics, "valkey")) == (1, 0)
    assert rl.doctor_check().level.value == "yellow"
    calls_while_down = vk.calls
    vk.down = False
    for _ in range(50):
        if rl.backend == "valkey":
            break
        await asyncio.sleep(0.05)
    assert rl.backend == "valkey" and backend(metrics, "valkey") == 1
    assert calls_while_down == 2  # the failing call itself; never one per call after it
    await rl.check(CALLER)
    assert vk.calls == 3
    switches = [r.getMessage() for r in caplog.records]
    assert len(switches) == 2 and "local limiter" in switches[0] and "again" in switches[1]
    await rl.close()


async def test_closed_mode_refuses_calls_while_valkey_is_unreachable() -> None:
    vk = FlakyValkey()
    vk.down = True
    rl, _ = limiter(vk, on_valkey_failure="closed")
    with pytest.raises(errors.Unavailable):
        await rl.check(CALLER)
    assert rl.doctor_check().level.value == "red"
    await rl.close()


async def test_one_slow_answer_is_decided_locally_without_leaving_valkey() -> None:
    vk = FlakyValkey()
    rl, metrics = limiter(vk, decision_timeout_ms=20)
    await rl.check(CALLER)
    vk.stall_s = 0.2
    await rl.check(CALLER)  # answered by the local limiter after 20 ms
    assert rl.backend == "valkey" and backend(metrics, "valkey") == 1
    await rl.close()


async def test_disabled_limiting_never_calls_valkey() -> None:
    vk = FlakyValkey()
    rl, _ = limiter(vk, enabled=False)
    for _ in range(10):
        await rl.check(CALLER)
    assert vk.calls == 0
    await rl.close()


def test_ratelimit_settings_load_from_the_environment_and_bad_ones_name_the_setting() -> None:

    cfg = config.load(environ={"TESSERA_RATELIMIT_ENABLED": "false",
                               "TESSERA_RATELIMIT_LOCAL_LIMITS": "read=5/2",
                               "TESSERA_RATELIMIT_DECISION_TIMEOUT_MS": "80"})
    assert (cfg.ratelimit.enabled, cfg.ratelimit.local_limits,
            cfg.ratelimit.decision_timeout_ms) == (False, "read=5/2", 80)
    for key, value, setting in (
            ("TESSERA_RATELIMIT_ON_VALKEY_FAILURE", "open", "ratelimit.on_valkey_failure"),
            ("TESSERA_RATELIMIT_PEER_LIMITS", "read=x", "ratelimit.peer_limits"),
            ("TESSERA_RATELIMIT_ENABLED", "maybe", "ratelimit.enabled")):
        with pytest.raises(errors.ConfigError) as exc:
            config.load(environ={key: value})
        assert exc.value.message.startswith(setting), exc.value.message


#: Only a guard against a hang: the test fails if a decision never comes back at all.
HANG_GUARD_S = 15.0


#: What a connection's handshake (HELLO 3, CLIENT SETINFO) gets from a server that goes
#: silent only after it: the least a RESP3 client accepts.
_HELLO = b"%2\r\n$6\r\nserver\r\n$6\r\nvalkey\r\n$5\r\nproto\r\n:3\r\n"


@dataclass
class Silent:
    """A TCP server on loopback that reads whatever it is sent and never answers a
    command; with `after_handshake`, it first completes each connection's handshake, so
    decisions do reach it (a server that hangs once connected)."""

    after_handshake: bool
    port: int = 0
    opened: int = 0
    closed: int = 0
    received: bytearray = field(default_factory=bytearray)

    @property
    def open_now(self) -> int:
        return self.opened - self.closed


def _command(buf: bytearray) -> tuple[bytes, int] | None:
    """The name of the first complete RESP command in `buf` and its length, or None."""
    if not buf.startswith(b"*") or (end := buf.find(b"\r\n")) < 0:
        return None
    pos, name = end + 2, b""
    for i in range(int(buf[1:end])):
        if (end := buf.find(b"\r\n", pos)) < 0:
            return None
        size = int(buf[pos + 1:end])
        if len(buf) < end + 2 + size + 2:
            return None
        if i == 0:
            name = bytes(buf[end + 2:end + 2 + size]).upper()
        pos = end + 2 + size + 2
    return name, pos


@pytest.fixture(params=["mute from the start", "mute after the handshake"])
async def silent_valkey(request: pytest.FixtureRequest) -> AsyncIterator[Silent]:
    silent = Silent(after_handshake=request.param == "mute after the handshake")
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.opened += 1
        held.append(writer)
        pending = bytearray()
        mute = not silent.after_handshake
        try:
            while data := await reader.read(65536):
                silent.received += data
                pending += data
                while not mute and (parsed := _command(pending)) is not None:
                    name, used = parsed
                    del pending[:used]
                    if name in (b"EVALSHA", b"EVAL", b"SCRIPT"):
                        mute = True  # the first decision: silence from here on
                    else:
                        writer.write(_HELLO if name == b"HELLO" else b"+OK\r\n")
        finally:
            silent.closed += 1  # the client hung up (EOF) or the test ended

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    silent.port = server.sockets[0].getsockname()[1]
    yield silent
    for w in held:
        w.close()
    server.close()
    await server.wait_closed()


def client_of(silent: Silent) -> redis.Redis:
    # No socket timeout on the client: only the limiter's decision timeout can end a wait.
    return redis.Redis(host="127.0.0.1", port=silent.port, socket_timeout=None)


async def decide_all(rl: RateLimiter, n: int, *, concurrently: bool) -> list[str]:
    async def one() -> str:
        try:
            await asyncio.wait_for(rl.check(CALLER), HANG_GUARD_S)
        except errors.ResourceExhausted:
            return "limited"
        return "ok"

    if concurrently:
        return list(await asyncio.gather(*(one() for _ in range(n))))
    return [await one() for _ in range(n)]


async def test_a_valkey_that_never_answers_is_decided_by_the_local_limiter(
    silent_valkey: Silent,
) -> None:
    client = client_of(silent_valkey)
    cfg = RateLimitConfig(local_limits="read=1/3", decision_timeout_ms=50,
                          probe_max_interval_s=60)
    rl = RateLimiter(cfg, client, key_prefix="t", metrics=Metrics(CollectorRegistry()))
    try:
        outcomes = await decide_all(rl, 4, concurrently=False)
    finally:
        await asyncio.wait_for(rl.close(), HANG_GUARD_S)
        await client.aclose()
    # The local limiter decided every call: its burst of 3, then a refusal.
    assert outcomes == ["ok", "ok", "ok", "limited"]
    if silent_valkey.after_handshake:
        assert b"EVALSHA" in silent_valkey.received  # the decisions did reach the server


async def test_concurrent_calls_on_a_silent_valkey_are_decided_locally_and_let_go_of_it(
    silent_valkey: Silent,
) -> None:
    client = client_of(silent_valkey)
    cfg = RateLimitConfig(local_limits="read=1/5", decision_timeout_ms=50,
                          probe_max_interval_s=60)
    rl = RateLimiter(cfg, client, key_prefix="t", metrics=Metrics(CollectorRegistry()))
    try:
        outcomes = await decide_all(rl, 40, concurrently=True)
        # Every round trip the calls started is given up: the server sees each connection
        # it was sent a decision on closed, none left waiting for an answer that never comes.
        await wait_until(lambda: silent_valkey.opened and silent_valkey.open_now == 0,
                         "the limiter's connections to the silent server are closed")
    finally:
        await asyncio.wait_for(rl.close(), HANG_GUARD_S)
        await client.aclose()
    assert sorted(outcomes) == ["limited"] * 35 + ["ok"] * 5


@pytest.mark.parametrize("silent_valkey", ["mute after the handshake"], indirect=True)
async def test_a_batch_nobody_waits_for_any_more_is_abandoned_and_its_connection_dropped(
    silent_valkey: Silent,
) -> None:
    """The batcher's half of the contract, step by step: it has no timer, so when every
    decision of a batch in flight has given up it must cancel the round trip itself."""
    if not silent_valkey.after_handshake:
        pytest.fail("unreachable: this test asks for a server that completes handshakes")
    client = client_of(silent_valkey)
    # stall_s long: later decisions queue behind the first instead of passing it.
    batcher = script.Batcher(client, stall_s=600)
    args = (*script.keys_for("t", "s", "read"), "read", 1_000_000, 1_000_000, 120)
    try:
        first = asyncio.create_task(batcher.decide(args))
        await wait_until(lambda: silent_valkey.received.count(b"EVALSHA") == 1,
                         "the first decision reached the server")
        queued = [asyncio.create_task(batcher.decide(args)) for _ in range(3)]
        await asyncio.sleep(0)  # let them queue (they are pending, not sent)
        assert silent_valkey.received.count(b"EVALSHA") == 1
        first.cancel()  # its caller gives up: the three queued leave as one batch
        await wait_until(lambda: silent_valkey.received.count(b"EVALSHA") == 4,
                         "the queued decisions were sent as a batch")
        assert silent_valkey.open_now == 1  # the first round trip's connection was dropped
        for task in queued:
            task.cancel()
        await wait_until(lambda: silent_valkey.open_now == 0,
                         "the abandoned batch's connection is closed")
        await asyncio.wait_for(batcher.close(), HANG_GUARD_S)
    finally:
        await client.aclose()
    for task in (first, *queued):
        assert task.cancelled()


def test_each_process_gets_its_share_of_a_limit() -> None:
    assert share_of(Limit(100, 40), 1) == Limit(100, 40)
    assert share_of(Limit(100, 40), 4) == Limit(25, 10)
    assert share_of(Limit(10, 1), 2) == Limit(5, 1)  # a burst of at least one
    assert share_of(Limit(0, 0), 4) == Limit(0, 0)  # unlimited stays unlimited


def test_two_local_limiters_together_admit_the_burst_once() -> None:
    limit = Limit(0.001, 10)
    workers = [LocalGcra(processes=2), LocalGcra(processes=2)]
    admitted = sum(w.decide("k", limit, now_us=1_000_000).allowed
                   for w in workers for _ in range(20))
    assert admitted == 10


async def test_the_limiter_takes_new_limits_and_fallback_mode() -> None:
    limiter = RateLimiter(RateLimitConfig(local_limits="read=10/3"), FlakyValkey(),  # type: ignore[arg-type]
                          key_prefix="t")
    assert limiter.local_limits["read"] == Limit(10, 3)
    limiter.reconfigure(RateLimitConfig(local_limits="read=1/2", peer_limits="search=3/4",
                                        decision_timeout_ms=80))
    assert limiter.local_limits["read"] == Limit(1, 2)
    assert limiter.peer_limits["search"] == Limit(3, 4)
    assert limiter.cfg.decision_timeout_ms == 80
    # While Valkey is down, a changed fallback mode applies at once.
    limiter._valkey_failed(TimeoutError())
    assert limiter.backend == "local"
    limiter.reconfigure(RateLimitConfig(on_valkey_failure="closed"))
    assert limiter.backend == "closed"
    await limiter.close()
