"""A token bucket for the backlog drain."""

from __future__ import annotations

import time


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
