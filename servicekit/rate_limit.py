"""Rate limiting with token buckets: one for pacing a single stream, and a bounded table per key.

The agent paces its backlog drain with one :class:`TokenBucket`; the bridge
limits each device with :class:`TokenBuckets`, whose table keeps at most
``max_keys`` buckets and evicts the least recently used. An evicted key starts
again with a full bucket, which only ever errs on the side of accepting.
A rate of 0 (or less) means no limit.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

Clock = Callable[[], float]


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` saved up (at least 1)."""

    __slots__ = ("_at", "_clock", "_tokens", "burst", "rate_per_s")

    def __init__(self, rate_per_s: float, burst: float, *, clock: Clock = time.monotonic) -> None:
        self.rate_per_s = rate_per_s
        self.burst = max(1.0, float(burst))
        self._clock = clock
        self._tokens = self.burst
        self._at = clock()

    @property
    def unlimited(self) -> bool:
        """True when the rate is 0 or less: every take succeeds."""
        return self.rate_per_s <= 0

    def take(self, count: int = 1) -> bool:
        """Take ``count`` tokens if they are all there; False (nothing taken) otherwise."""
        if self.unlimited:
            return True
        self._refill()
        if self._tokens < count:
            return False
        self._tokens -= count
        return True

    def take_up_to(self, wanted: int) -> int:
        """Take as many whole tokens as are there, at most ``wanted``."""
        if self.unlimited:
            return max(wanted, 0)
        self._refill()
        got = max(min(wanted, int(self._tokens)), 0)
        self._tokens -= got
        return got

    def give_back(self, count: int) -> None:
        """Return unused tokens (never above the burst)."""
        self._tokens = min(self.burst, self._tokens + count)

    def seconds_until(self, count: int = 1) -> float:
        """How long until ``count`` tokens are there (0 when they are, or unlimited)."""
        if self.unlimited:
            return 0.0
        self._refill()
        missing = count - self._tokens
        return 0.0 if missing <= 0 else missing / self.rate_per_s

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate_per_s)
        self._at = now


class TokenBuckets:
    """One :class:`TokenBucket` per key, at most ``max_keys`` of them (LRU).

    Callers validate keys first: the table stores what it is given, so an
    unbounded key (a 4 KB topic level) would cost that much per entry.

    Args:
        rate_per_s: refill rate of every bucket; 0 disables the limit.
        burst: bucket size.
        max_keys: how many buckets to keep.
        clock: monotonic seconds, replaceable in tests.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: float,
        *,
        max_keys: int = 100_000,
        clock: Clock = time.monotonic,
    ) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets

    def allow(self, key: str) -> bool:
        """Take one token from ``key``'s bucket; False when it is empty."""
        if self.rate_per_s <= 0:
            return True
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.rate_per_s, self.burst, clock=self._clock)
            self._buckets[key] = bucket
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take()
