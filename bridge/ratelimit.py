"""A per-device token bucket, kept in memory with a bounded number of devices."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBuckets:
    """One token bucket per device: ``rate_per_s`` tokens a second, at most ``burst``.

    Buckets of devices not seen for a while are evicted oldest-first once more
    than ``max_devices`` are tracked; an evicted device starts again with a
    full bucket, which only ever errs on the side of accepting.

    Args:
        rate_per_s: refill rate; 0 disables the limit.
        burst: bucket size.
        max_devices: how many buckets to keep.
        clock: monotonic seconds, replaceable in tests.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        max_devices: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._max_devices = max_devices
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, device_id: str) -> bool:
        """Take one token for ``device_id``; False when its bucket is empty."""
        if self._rate <= 0:
            return True
        now = self._clock()
        tokens, last = self._buckets.pop(device_id, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[device_id] = (tokens, now)
        if len(self._buckets) > self._max_devices:
            self._buckets.popitem(last=False)
        return allowed
