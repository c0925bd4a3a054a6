"""The per-peer circuit breaker, with the clock passed in."""

from __future__ import annotations

from tessera.federation import BreakerState, CircuitBreaker


def test_opens_after_threshold_failures_and_fails_fast_during_cooldown() -> None:
    b = CircuitBreaker(threshold=3, cooldown_s=10)
    for t in (0.0, 1.0):
        b.failure(t)
        assert b.allow(t + 0.1)
    b.failure(2.0)
    assert b.state(2.5) is BreakerState.OPEN
    assert not b.allow(5.0)


def test_half_open_lets_exactly_one_probe_through_and_a_success_closes() -> None:
    b = CircuitBreaker(threshold=1, cooldown_s=10)
    b.failure(0.0)
    assert b.state(10.0) is BreakerState.HALF_OPEN
    assert b.allow(10.0)
    assert not b.allow(10.1), "a second probe must wait for the first"
    b.success()
    assert b.state(10.2) is BreakerState.CLOSED and b.allow(10.2)


def test_a_failed_probe_reopens_for_a_full_cooldown() -> None:
    b = CircuitBreaker(threshold=5, cooldown_s=10)
    for t in range(5):
        b.failure(float(t))
    assert b.allow(14.0)
    b.failure(14.0)
    assert b.state(20.0) is BreakerState.OPEN
    assert b.state(24.0) is BreakerState.HALF_OPEN


def test_success_resets_the_failure_count() -> None:
    b = CircuitBreaker(threshold=2, cooldown_s=10)
    b.failure(0.0)
    b.success()
    b.failure(1.0)
    assert b.state(1.5) is BreakerState.CLOSED


def test_merge_sorted_interleaves_sources_and_cuts_at_the_limit() -> None:
    from tessera.federation._merge import merge_sorted

    pages = [("local", [("a", 1), ("c", 3)]), ("b", [("b", 2), ("d", 4)]), ("c", [])]
    merged = merge_sorted(pages, lambda _s, row: row[0], limit=3)
    assert merged == [("local", ("a", 1)), ("b", ("b", 2)), ("local", ("c", 3))]
    by_score = merge_sorted(pages, lambda _s, row: row[1], limit=2, reverse=True)
    assert [row for _, row in by_score] == [("d", 4), ("c", 3)]


def test_a_probe_that_never_reports_does_not_keep_the_breaker_shut() -> None:
    b = CircuitBreaker(threshold=1, cooldown_s=10)
    b.failure(0.0)
    assert b.allow(10.0)  # the probe goes out ... and is cancelled: no success, no failure
    assert not b.allow(15.0)
    assert b.allow(20.0), "after another cool-down a new probe may go"
