"""The simulator's own event-loop lag: how late a ticker's wakeups come, and why.

A device's receive time is read when the event loop gets to its socket, so a
busy or starved loop adds its lag to every latency the simulator measures. A
ticker that sleeps ``interval_s`` records how much later than asked it woke
and how much CPU the loop's thread used meanwhile: a late wakeup with the
thread on its CPU all along was the loop's own work (callbacks that ran
long); one with the thread mostly off it was waiting for a core (other
processes on the machine). Shown beside the latencies, it tells the
simulator's share from the cloud's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import NamedTuple

INTERVAL_S = 0.01


class Tick(NamedTuple):
    """One wakeup: when (monotonic s, or s from the load's start in a record), how late
    (ms), and the loop thread's CPU (ms) since the previous wakeup."""

    t: float
    late_ms: float
    cpu_ms: float


class LoopLag:
    """The ticks of a ticker on the running loop."""

    def __init__(self, interval_s: float = INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.samples: list[Tick] = []

    async def _tick(self) -> None:
        interval = self.interval_s
        append = self.samples.append
        clock, cpu = time.monotonic, time.thread_time
        last_cpu = cpu()
        due = clock() + interval
        while True:
            await asyncio.sleep(max(0.0, due - clock()))
            now, used = clock(), cpu()
            append(Tick(now, (now - due) * 1000, (used - last_cpu) * 1000))
            # The next wakeup is asked from now: one late wakeup is one sample, not a burst.
            due, last_cpu = now + interval, used

    def between(self, start: float, end: float) -> list[float]:
        """The lateness (ms) of the wakeups between ``start`` and ``end`` (monotonic)."""
        return [tick.late_ms for tick in self.samples if start <= tick.t <= end]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[LoopLag]:
        """Tick while the block runs."""
        task = asyncio.create_task(self._tick(), name="loop-lag")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def own_share(ticks: Sequence[Tick], interval_s: float, late_ms: float = 20.0) -> float | None:
    """Of the time spanned by wakeups later than ``late_ms``, the share the loop's thread
    was on its CPU (its own work); the rest it waited for a core. None: no such wakeup."""
    late = [tick for tick in ticks if tick.late_ms > late_ms]
    span = sum(tick.late_ms + interval_s * 1000 for tick in late)
    return min(1.0, sum(tick.cpu_ms for tick in late) / span) if span else None
