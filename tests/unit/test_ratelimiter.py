"""The limiter's backend switching, against a stand-in Valkey that fails on command."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis.exceptions import ConnectionError as RedisConnectionError

from tessera.calls import Caller
from tessera.config import RateLimitConfig
from tessera.core import errors
from tessera.observability import Metrics
from tessera.pki import SpiffeId
from tessera.pki._identity import IdentityKind
from tessera.ratelimit import RateLimiter

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
    from tessera import config

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
