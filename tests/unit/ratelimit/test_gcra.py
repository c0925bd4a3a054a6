"""GCRA arithmetic, limit parsing and method classes: pure functions, no services."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.ratelimit import (
    Limit,
    LocalGcra,
    effective_limit,
    gcra,
    method_class,
    parse_limits,
    subject_of,
)

S = 1_000_000  # microseconds per second


def run(limit: Limit, times_us: list[int]) -> list[bool]:
    """Admit-or-refuse for each timestamp, threading the state through."""
    tat: int | None = None
    out = []
    for now in times_us:
        d = gcra(tat, now, limit.interval_us, limit.tolerance_us)
        if d.allowed:
            tat = d.tat_us
        out.append(d.allowed)
    return out


def test_a_fresh_subject_gets_exactly_its_burst_at_once() -> None:
    limit = Limit(10, 5)
    assert run(limit, [S] * 7) == [True] * 5 + [False] * 2


def test_retry_after_is_when_the_next_call_is_admitted() -> None:
    limit = Limit(10, 1)
    first = gcra(None, S, limit.interval_us, limit.tolerance_us)
    refused = gcra(first.tat_us, S + 30_000, limit.interval_us, limit.tolerance_us)
    assert not refused.allowed and refused.retry_after_us == 70_000
    assert refused.tat_us == first.tat_us  # a refusal does not consume capacity
    early = gcra(first.tat_us, S + 99_999, limit.interval_us, limit.tolerance_us)
    on_time = gcra(first.tat_us, S + 100_000, limit.interval_us, limit.tolerance_us)
    assert not early.allowed and on_time.allowed


def test_a_steady_caller_at_the_rate_is_never_refused() -> None:
    limit = Limit(50, 1)
    assert all(run(limit, [S + i * limit.interval_us for i in range(500)]))


def test_an_idle_subject_regains_its_full_burst() -> None:
    limit = Limit(10, 3)
    assert run(limit, [S, S, S, S, S + 10 * S, S + 10 * S, S + 10 * S, S + 10 * S]) == [
        True, True, True, False, True, True, True, False]


@settings(max_examples=200, deadline=None)
@given(rate=st.integers(1, 500), burst=st.integers(1, 50),
       gaps=st.lists(st.integers(0, 40_000), min_size=1, max_size=400))
def test_admitted_calls_in_any_window_stay_within_burst_plus_rate(
        rate: int, burst: int, gaps: list[int]) -> None:
    limit = Limit(rate, burst)
    times, now = [], S
    for g in gaps:
        now += g
        times.append(now)
    admitted = [t for t, ok in zip(times, run(limit, times), strict=True) if ok]
    for i, t0 in enumerate(admitted):
        for t1 in admitted[i:]:
            n = sum(1 for t in admitted if t0 <= t <= t1)
            assert n <= burst + (t1 - t0) / limit.interval_us + 1e-9


def test_the_local_fallback_is_the_same_arithmetic() -> None:
    local, limit = LocalGcra(), Limit(20, 4)
    times = [S, S, S + 1000, S + 2000, S + 3000, S + 60_000, S + 60_000, S + 200_000]
    assert [local.decide("k", limit, t).allowed for t in times] == run(limit, times)


def test_method_classes_follow_the_services() -> None:
    q = "tessera.v1.QueryService"
    assert [method_class(q, m) for m in ("GetResource", "ListResources", "Describe",
                                         "SearchResources")] == ["read"] * 3 + ["search"]
    assert method_class("tessera.v1.CommandService", "Execute") == "command"
    assert method_class("tessera.v1.EventService", "Subscribe") == "event"
    assert method_class("tessera.v1.AdminService", "Doctor") == "admin"


def test_limits_parse_and_bad_ones_name_the_setting() -> None:
    assert parse_limits("x", "read=50/100, search = 2.5/5 ,admin=0") == {
        "read": Limit(50, 100), "search": Limit(2.5, 5), "admin": Limit(0, 0)}
    assert parse_limits("x", "") == {}
    for bad in ("reed=1/2", "read=fast/2", "read=-1/2", "read=5/0", "read"):
        with pytest.raises(ValueError, match=r"^ratelimit\.local_limits: "):
            parse_limits("ratelimit.local_limits", bad)


@dataclass
class FakeGrant:
    name: str
    rate_per_s: float = 0.0
    burst: int = 0


def test_a_grant_rate_applies_per_class_and_falls_back_to_peer_defaults() -> None:
    local = {"read": Limit(1000, 2000)}
    peer = {"read": Limit(50, 100), "search": Limit(10, 20)}
    own = FakeGrant("grants/a", rate_per_s=7, burst=3)
    assert effective_limit(own, "read", local, peer) == (Limit(7, 3), "grant")
    assert effective_limit(own, "search", local, peer) == (Limit(7, 3), "grant")
    assert effective_limit(FakeGrant("grants/b"), "search", local, peer) == (
        Limit(10, 20), "default_peer")
    assert effective_limit(None, "read", local, peer) == (Limit(1000, 2000), "default_local")
    assert effective_limit(None, "admin", local, peer)[0].unlimited


def test_peers_are_limited_per_grant_and_locals_per_identity() -> None:
    assert subject_of("spiffe://d/node/b", FakeGrant("grants/x")) == "grants/x"
    assert subject_of("spiffe://d/client/local", None) == "spiffe://d/client/local"


@given(tat=st.one_of(st.none(), st.integers(0, 3 * S)), interval=st.integers(1, S),
       burst=st.integers(1, 20))
def test_an_admitted_call_has_nothing_to_wait_for(tat: int | None, interval: int,
                                                  burst: int) -> None:
    d = gcra(tat, 2 * S, interval, burst * interval)
    if d.allowed:
        assert d.retry_after_us == 0 and d.retry_after_s == 0.0
        assert d.tat_us == max(tat or 0, 2 * S) + interval
    else:
        assert d.retry_after_us > 0 and d.tat_us == tat


def test_a_limit_with_less_than_one_call_of_tolerance_refuses_even_a_fresh_key() -> None:
    # Why Limit clamps the burst to at least one: below that nothing is ever admitted.
    d = gcra(None, S, 100, 40)
    assert not d.allowed and d.retry_after_us == 60
    # A fresh key has no TAT to keep unchanged: it reports now, as the TAT a fresh key starts at.
    assert d.tat_us == S
    assert gcra(d.tat_us, S + 60, 100, 40).allowed is False
