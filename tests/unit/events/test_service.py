"""Unit tests of tessera.events: service."""

from __future__ import annotations

from tessera.events import (
    lock_key,
)


def test_durable_lock_keys_are_per_caller_and_name() -> None:
    a = lock_key("spiffe://t/client/a", "s")
    assert a == lock_key("spiffe://t/client/a", "s")
    assert a != lock_key("spiffe://t/client/b", "s")
    assert a != lock_key("spiffe://t/client/a", "t")
    assert -(2**63) <= a < 2**63
