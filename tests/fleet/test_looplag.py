"""The simulator's loop-lag probe sees a loop that was blocked."""

from __future__ import annotations

import asyncio
import time

from fleet.looplag import LoopLag


def _block(seconds: float) -> None:
    """Hold the event loop's thread: nothing on the loop runs meanwhile."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


async def test_a_blocked_loop_shows_as_a_late_wakeup() -> None:
    lag = LoopLag(0.01)
    async with lag.running():
        await asyncio.sleep(0.05)
        blocked_at = time.monotonic()
        _block(0.2)
        await asyncio.sleep(0.05)
    # Its next wakeup was due at most 10 ms after the block began: ≥ 190 ms late. A busy
    # machine only makes it later, so half of that is a bound with slack.
    assert max(lag.between(blocked_at, time.monotonic())) >= 100
    assert lag.between(0.0, blocked_at)  # it ticked before the block too
