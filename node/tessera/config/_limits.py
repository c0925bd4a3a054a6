"""Rate-limit settings parsed into typed values (the limiter in `tessera.ratelimit` uses them)."""

from __future__ import annotations

from dataclasses import dataclass

MICROS = 1_000_000

READ, SEARCH, COMMAND, EVENT, ADMIN = "read", "search", "command", "event", "admin"
#: Every method class, in the order they are shown.
METHOD_CLASSES = (READ, SEARCH, COMMAND, EVENT, ADMIN)


@dataclass(frozen=True)
class Limit:
    """A rate with a burst; `rate_per_s <= 0` means unlimited."""

    rate_per_s: float
    burst: int

    @property
    def unlimited(self) -> bool:
        """True when no call is ever refused."""
        return self.rate_per_s <= 0

    @property
    def interval_us(self) -> int:
        """Microseconds between calls at the sustained rate (at least 1)."""
        return max(1, round(MICROS / self.rate_per_s))

    @property
    def tolerance_us(self) -> int:
        """How far TAT may run ahead of now: `burst` calls' worth of intervals."""
        return max(1, self.burst) * self.interval_us


def parse_limits(setting: str, text: str) -> dict[str, Limit]:
    """Parse "read=200/400, search=20/40, admin=0" (rate per second / burst; 0 = unlimited).

    Raises ValueError with a message naming the setting and the fix.
    """
    limits: dict[str, Limit] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in METHOD_CLASSES:
            raise ValueError(f"{setting}: {item!r} must be <class>=<rate_per_s>/<burst> with a "
                             f"class among {', '.join(METHOD_CLASSES)}")
        rate_s, _, burst_s = value.partition("/")
        try:
            rate = float(rate_s)
            burst = int(burst_s) if burst_s.strip() else (max(1, round(rate)) if rate else 0)
        except ValueError:
            raise ValueError(f"{setting}: {item!r} needs numbers, e.g. {name}=50/100") from None
        if rate < 0 or burst < 0 or (rate > 0 and burst < 1):
            raise ValueError(f"{setting}: {item!r} needs rate >= 0 and burst >= 1")
        limits[name] = Limit(rate, burst)
    return limits
