"""The simulator's own event-loop lag: how late a ticker's wakeups come.

A device's receive time is read when the event loop gets to its socket, so a
busy or starved loop adds its lag to every latency the simulator measures. A
ticker that sleeps ``interval_s`` and records how much later than asked it
woke shows that lag beside the latencies, so a reader can tell the
simulator's share from the cloud's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

INTERVAL_S = 0.01


class LoopLag:
    """Lateness of each wakeup (ms) of a ticker on the running loop, with its monotonic time."""

    def __init__(self, interval_s: float = INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []

    async def _tick(self) -> None:
        interval = self.interval_s
        append = self.samples.append
        due = time.monotonic() + interval
        while True:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            now = time.monotonic()
            append((now, (now - due) * 1000))
            # The next wakeup is asked from now: one late wakeup is one sample, not a burst.
            due = now + interval

    def between(self, start: float, end: float) -> list[float]:
        """The lateness (ms) of the wakeups between ``start`` and ``end`` (monotonic)."""
        return [ms for t, ms in self.samples if start <= t <= end]

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
