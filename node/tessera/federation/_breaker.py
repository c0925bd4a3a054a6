"""A per-peer circuit breaker: pure state, the clock passed in."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class BreakerState(enum.StrEnum):
    """Closed: calls flow. Open: fail fast. Half-open: one probe call decides."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CircuitBreaker:
    """Opens after `threshold` consecutive failures; after `cooldown_s` lets one probe through."""

    threshold: int = 3
    cooldown_s: float = 10.0
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False
    probe_started_at: float = 0.0

    def state(self, now: float) -> BreakerState:
        """The state at time `now`."""
        if self.opened_at is None:
            return BreakerState.CLOSED
        if now - self.opened_at >= self.cooldown_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def allow(self, now: float) -> bool:
        """Whether a call may go out now (in half-open, only one probe at a time)."""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return True
        # A probe that never reported (cancelled with its caller) must not keep the breaker
        # shut for good: after another cool-down a new probe may go.
        probe_lost = self.probing and now - self.probe_started_at >= self.cooldown_s
        if state is BreakerState.HALF_OPEN and (not self.probing or probe_lost):
            self.probing, self.probe_started_at = True, now
            return True
        return False

    def success(self) -> None:
        """A call succeeded: close."""
        self.failures, self.opened_at, self.probing = 0, None, False

    def failure(self, now: float) -> None:
        """A call failed (transport-level): count it, open at the threshold or on a failed probe."""
        self.failures += 1
        if self.probing or self.failures >= self.threshold:
            self.opened_at = now
        self.probing = False
