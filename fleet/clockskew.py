"""Jumps of the wall clock the simulated devices read, in this process only.

Every agent takes wall time from :func:`servicekit.clock.now_ms`, which reads
``time.time_ns`` through its module's ``time``; :class:`WallClockSkew` swaps
that one reference for a shifted clock. The bridge, the pipeline and Redis run
in their own processes and keep the true time, as the cloud would while a
device's clock is wrong. Monotonic time is never touched.
"""

from __future__ import annotations

import types

import servicekit.clock


class WallClockSkew:
    """Shifts ``servicekit.clock.now_ms`` by a total offset; :meth:`restore` undoes it."""

    def __init__(self) -> None:
        self.offset_s = 0.0
        self._real: types.ModuleType = vars(servicekit.clock)["time"]

    def jump(self, seconds: float) -> None:
        """Move the devices' wall clock by ``seconds`` (negative: back)."""
        self.offset_s += seconds
        offset_ns = int(self.offset_s * 1e9)
        real = self._real
        skewed = types.SimpleNamespace(time_ns=lambda: real.time_ns() + offset_ns)
        vars(servicekit.clock)["time"] = skewed

    def restore(self) -> None:
        """The true wall clock again."""
        vars(servicekit.clock)["time"] = self._real
        self.offset_s = 0.0
