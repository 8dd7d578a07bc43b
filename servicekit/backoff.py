"""The one retry pacing every loop uses: capped exponential backoff with full jitter.

Full jitter (AWS architecture blog, "Exponential Backoff And Jitter") draws
each wait uniformly from ``[0, min(cap, base·2^n)]``, which spreads a fleet
that lost the same server at the same instant over the whole window. The
exponent is clamped, so a loop can fail for ever without overflowing a float.
"""

from __future__ import annotations

import asyncio
import random
from typing import Final

# 2**64 exceeds any cap anyone configures; beyond it the window no longer grows.
_MAX_EXPONENT: Final = 64


def full_jitter(
    attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry ``attempt`` (0-based); never raises for any attempt."""
    window = min(cap_s, base_s * 2.0 ** min(max(attempt, 0), _MAX_EXPONENT))
    return (rng or random).uniform(0.0, window)


class Backoff:
    """Retry pacing for one loop: call :meth:`wait` after a failure, :meth:`reset` after a success.

    Resetting on success matters: a loop that only ever counts failures ends up
    at the cap after enough unrelated errors over its lifetime, and then sleeps
    the full cap after the next blip.
    """

    def __init__(self, base_s: float, cap_s: float, rng: random.Random | None = None) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.failures = 0
        self._rng = rng

    def next_delay(self) -> float:
        """The wait before the next try, counting one more failure."""
        delay = full_jitter(self.failures, self.base_s, self.cap_s, self._rng)
        self.failures += 1
        return delay

    async def wait(self) -> None:
        """Sleep for :meth:`next_delay`."""
        await asyncio.sleep(self.next_delay())

    def reset(self) -> None:
        """The last try succeeded: start again from ``base_s``."""
        self.failures = 0
