"""GCRA (generic cell rate algorithm) as a pure function over integer microseconds.

The state of one limit is a single number, the theoretical arrival time (TAT). A call at
`now` is admitted when `max(TAT, now) + interval - tolerance <= now`; admitting moves
TAT forward by one interval. Over any window [t0, t1] at most `burst + rate * (t1 - t0)`
calls are admitted, and a steady caller gets exactly `rate` per second.

Integers keep this function and the Valkey Lua script (`_script.LUA`) bit-for-bit equal:
Lua numbers are doubles, exact for integers below 2**53 (microseconds since 1970 are
about 2**51).
"""

from __future__ import annotations

from dataclasses import dataclass

MICROS = 1_000_000


@dataclass(frozen=True)
class Decision:
    """The outcome of one GCRA step."""

    allowed: bool
    #: Microseconds until this call would be admitted; 0 when allowed.
    retry_after_us: int
    #: The TAT to store (unchanged when refused).
    tat_us: int

    @property
    def retry_after_s(self) -> float:
        """`retry_after_us` in seconds."""
        return self.retry_after_us / MICROS


def gcra(tat_us: int | None, now_us: int, interval_us: int, tolerance_us: int) -> Decision:
    """One admission decision; `tat_us` None means no state (a fresh or expired key)."""
    tat = now_us if tat_us is None or tat_us < now_us else tat_us
    new_tat = tat + interval_us
    allow_at = new_tat - tolerance_us
    if allow_at > now_us:
        return Decision(False, allow_at - now_us, tat_us if tat_us is not None else now_us)
    return Decision(True, 0, new_tat)

