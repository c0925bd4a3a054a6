"""GCRA decisions at their edges: what an admitted call and a refused fresh key report."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tessera.ratelimit import gcra

S = 1_000_000


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
