"""A Valkey that accepts connections but never answers cannot hold a call: the decision
timeout hands it to the local limiter, and nothing stays parked on the silent server.

The limiter's `decision_timeout_ms` is the only bound on a decision (the batcher and its
line have no timer of their own), so without it these calls would hang: the hang guard
below is what fails then, never an assertion on how long a call took.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import redis.asyncio as redis
from prometheus_client import CollectorRegistry

from tessera.calls import Caller
from tessera.config import RateLimitConfig
from tessera.core import errors
from tessera.observability import Metrics
from tessera.pki import IdentityKind, SpiffeId
from tessera.ratelimit import RateLimiter
from tessera.ratelimit import _script as script
from tests.fixtures.waiting import wait_until

CALLER = Caller(SpiffeId("tessera.local", IdentityKind.CLIENT, "local"), 1, "", "r",
                "tessera.v1.QueryService", "Describe")
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
