"""The agent's clock: elapsed time that a wall-clock jump cannot move.

Two questions need time on a device, and neither may follow the wall clock:

* *Timeouts* (receipt deadlines, retry times, status-query delays): a wall
  clock set back three days would stall every retry for three days.
* *The dedup horizon*: the bridge forgets an order's dedup marker 7 days
  (``schemas.names.DEDUP_TTL_S``) after it first stored it, measured by the
  cloud. An order may be sent only while less than ``resend_max_age_s`` has
  really elapsed since its first send. A wall clock set forward would give up
  on orders early; set back, it would send them after the bridge forgot them.

So the agent keeps its own clock, in ms, persisted in the outbox (``meta``):
while the agent runs it advances with ``time.monotonic`` only; across a
restart (power cut, reboot: the monotonic clock starts again) it advances by
the wall-clock gap since it was last saved, never by less than zero. That
gap is the only measure of downtime a device has; a forward jump while off
counts as downtime (the agent gives up early, raising its alarm, rather
than risk a duplicate), a backward jump while off counts as none.

It starts at the wall time when the database is created, so its values read
like timestamps; they are not, and are never compared with the wall clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from servicekit.clock import now_ms

# Saved with the next write batch (or by maintenance) once this much has elapsed
# since the last save. Rarely is enough: a restart adds the wall-clock time since
# the save, which covers the unsaved running time too; only a wall-clock jump in
# that unsaved minute before a crash is counted wrongly. An idle device writes
# once a minute for it, not every few seconds (flash wear).
SAVE_EVERY_MS = 60_000


class AgentClock:
    """Monotonic agent time in ms that survives restarts; see the module docstring.

    Args:
        wall_ms: the wall clock (ms since the epoch); injectable for tests.
        monotonic_s: the monotonic clock (s); injectable for tests.
    """

    def __init__(
        self,
        wall_ms: Callable[[], int] = now_ms,
        monotonic_s: Callable[[], float] = time.monotonic,
    ) -> None:
        self.wall_ms = wall_ms
        self.monotonic_s = monotonic_s
        self._base_ms = wall_ms()
        self._mono_at_base = monotonic_s()
        self.saved_ms = self._base_ms

    def resume(self, saved_clock_ms: int, saved_wall_ms: int) -> None:
        """Continue from a saved reading: add the wall-clock downtime, if positive."""
        downtime_ms = max(0, self.wall_ms() - saved_wall_ms)
        self._base_ms = saved_clock_ms + downtime_ms
        self._mono_at_base = self.monotonic_s()
        self.saved_ms = saved_clock_ms

    def now_ms(self) -> int:
        """The agent clock now."""
        return self._base_ms + int((self.monotonic_s() - self._mono_at_base) * 1000)

    def due_for_save(self, now: int) -> bool:
        """True when the persisted reading is older than :data:`SAVE_EVERY_MS`."""
        return now - self.saved_ms >= SAVE_EVERY_MS
