"""Pacing helpers: full-jitter backoff and a token bucket for the backlog drain."""

from __future__ import annotations

import random
import time


def full_jitter(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): uniform in [0, min(cap, base·2^n)].

    Full jitter (AWS architecture blog, "Exponential Backoff And Jitter")
    spreads a fleet that lost the broker at the same instant over the whole
    window instead of bunching it at the window's edges.
    """
    return rng.uniform(0.0, min(cap_s, base_s * 2 ** min(attempt, 32)))


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = max(1.0, burst)
        self._tokens = self.burst
        self._at = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate_per_s)
        self._at = now

    def take_up_to(self, wanted: int) -> int:
        """Take as many whole tokens as are available, at most ``wanted``."""
        self._refill()
        got = min(wanted, int(self._tokens))
        self._tokens -= got
        return max(got, 0)

    def give_back(self, count: int) -> None:
        """Return unused tokens."""
        self._tokens = min(self.burst, self._tokens + count)

    def seconds_until(self, count: int = 1) -> float:
        """How long until ``count`` tokens are there."""
        self._refill()
        missing = count - self._tokens
        return 0.0 if missing <= 0 else missing / self.rate_per_s
