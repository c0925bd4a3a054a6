"""A Valkey that accepts connections but never answers cannot hold a call: the decision
timeout hands it to the local limiter."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis
from prometheus_client import CollectorRegistry

from tessera.calls import Caller
from tessera.config import RateLimitConfig
from tessera.core import errors
from tessera.observability import Metrics
from tessera.pki import IdentityKind, SpiffeId
from tessera.ratelimit import RateLimiter

CALLER = Caller(SpiffeId("tessera.local", IdentityKind.CLIENT, "local"), 1, "", "r",
                "tessera.v1.QueryService", "Describe")
#: Only a guard against a hang: the test fails if a decision never comes back at all.
HANG_GUARD_S = 30.0


@pytest.fixture
async def silent_valkey() -> AsyncIterator[int]:
    """A TCP server on loopback that reads whatever it is sent and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(4096):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield port
    for w in held:
        w.close()
    server.close()
    await server.wait_closed()


async def test_a_valkey_that_never_answers_is_decided_by_the_local_limiter(
    silent_valkey: int,
) -> None:
    # No socket timeout on the client: only the limiter's decision timeout can end a wait.
    client = redis.Redis(host="127.0.0.1", port=silent_valkey, socket_timeout=None)
    cfg = RateLimitConfig(local_limits="read=1/3", decision_timeout_ms=50,
                          probe_max_interval_s=60)
    rl = RateLimiter(cfg, client, key_prefix="t", metrics=Metrics(CollectorRegistry()))
    outcomes = []
    try:
        for _ in range(4):
            try:
                await asyncio.wait_for(rl.check(CALLER), HANG_GUARD_S)
                outcomes.append("ok")
            except errors.ResourceExhausted:
                outcomes.append("limited")
    finally:
        await rl.close()
        await client.aclose()
    # The local limiter decided every call: its burst of 3, then a refusal.
    assert outcomes == ["ok", "ok", "ok", "limited"]
