"""The simulator's loop-lag probe sees a loop that was blocked, and tells why it was late."""

from __future__ import annotations

import asyncio
import time

from fleet.looplag import LoopLag, Tick, own_share


def _block(seconds: float) -> None:
    """Hold the event loop's thread: nothing on the loop runs meanwhile."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


async def test_a_blocked_loop_shows_as_a_late_wakeup_with_its_cpu() -> None:
    lag = LoopLag(0.01)
    async with lag.running():
        await asyncio.sleep(0.05)
        blocked_at = time.monotonic()
        _block(0.2)
        await asyncio.sleep(0.05)
    after = [tick for tick in lag.samples if tick.t >= blocked_at]
    late = max(after, key=lambda tick: tick.late_ms)
    # Its next wakeup was due at most 10 ms after the block began: ≥ 190 ms late. A busy
    # machine only makes it later, so half of that is a bound with slack.
    assert late.late_ms >= 100
    assert late.cpu_ms > 0  # the thread spun on its CPU for part of that, at least
    assert lag.between(0.0, blocked_at)  # it ticked before the block too


def test_own_share_splits_late_time_into_own_work_and_waiting() -> None:
    ticks = [
        Tick(1.0, 1.0, 10.0),  # on time: not counted
        Tick(2.0, 90.0, 100.0),  # 100 ms span, all of it on the CPU: own work
        Tick(3.0, 290.0, 0.0),  # 300 ms span off the CPU: waiting for a core
    ]
    assert own_share(ticks, 0.01) == 0.25
    assert own_share(ticks[:1], 0.01) is None
