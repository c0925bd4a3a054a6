"""Pure parts of a reload: which settings changed, what a reload may apply, where the
configuration is read from again, and the limiter taking new limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from tessera import config
from tessera.config import Limit, RateLimitConfig
from tessera.core.errors import ConfigError
from tessera.ratelimit import RateLimiter
from tests.unit.test_ratelimiter import FlakyValkey


def test_changed_settings_names_each_changed_field_in_order(tmp_path: Path) -> None:
    old = config.load(None, environ={})
    new = config.load(None, environ={}, overrides={"ratelimit.local_limits": "read=1/1",
                                                   "store.pool_max": "7",
                                                   "log.level": "debug"})
    assert config.changed_settings(old, new) == ["store.pool_max", "ratelimit.local_limits",
                                                 "log.level"]
    assert config.changed_settings(old, old) == []


def test_with_reloadable_takes_only_the_reloadable_sections() -> None:
    old = config.load(None, environ={})
    new = config.load(None, environ={}, overrides={"ratelimit.local_limits": "read=1/1",
                                                   "store.pool_max": "7",
                                                   "log.access": "false"})
    merged = config.with_reloadable(old, new)
    assert merged.ratelimit.local_limits == "read=1/1"
    assert merged.log.access is False
    assert merged.store.pool_max == old.store.pool_max
    assert config.changed_settings(old, merged) == ["ratelimit.local_limits", "log.access"]


def test_a_config_source_reads_the_file_again_and_survives_the_spec(tmp_path: Path) -> None:
    path = tmp_path / "tessera.toml"
    path.write_text('[ratelimit]\nlocal_limits = "read=5/5"\n')
    source = config.ConfigSource(str(path), {"TESSERA_STORE_POOL_MAX": "9"},
                                 {"node.data_dir": str(tmp_path)})
    again = config.ConfigSource.from_json(source.to_json())
    assert again == source
    cfg = again.load()
    assert (cfg.ratelimit.local_limits, cfg.store.pool_max) == ("read=5/5", 9)
    path.write_text('[ratelimit]\nlocal_limits = "read=6/6"\n')
    assert again.load().ratelimit.local_limits == "read=6/6"
    path.write_text('[ratelimit]\nlocal_limits = "read=x"\n')
    with pytest.raises(ConfigError, match=r"ratelimit\.local_limits"):
        again.load()


@pytest.mark.parametrize("level", ["debug", "INFO", "warning", ""])
def test_log_level_accepts_the_levels(level: str) -> None:
    assert config.load(None, environ={"TESSERA_LOG_LEVEL": level}).log.level == level


def test_log_level_refuses_anything_else() -> None:
    with pytest.raises(ConfigError, match=r"log\.level"):
        config.load(None, environ={"TESSERA_LOG_LEVEL": "loud"})


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
