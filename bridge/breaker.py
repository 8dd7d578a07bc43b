"""A circuit breaker: stop calling a remote that keeps failing, try again later.

States::

    closed ──(failures in a row ≥ threshold)──▶ open ──(open_s elapsed)──▶ half-open
      ▲                                                                       │
      └──────────────────(a trial succeeds)──── half-open ──(it fails)──▶ open

While open, :meth:`CircuitBreaker.allow` answers False and the caller gives up
at once instead of waiting out a timeout per call. The bridge keeps one per
remote region (:mod:`bridge.regions`).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class BreakerState(enum.IntEnum):
    """The breaker's state; the value is what the Prometheus gauge shows."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2

    @property
    def label(self) -> str:
        """``closed``, ``half_open`` or ``open``."""
        return self.name.lower()


class CircuitBreaker:
    """Counts consecutive failures of one remote and decides whether to call it.

    Args:
        failure_threshold: failures in a row that open the breaker.
        open_s: how long it stays open before one trial call is let through.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        *,
        failure_threshold: int,
        open_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = failure_threshold
        self._open_s = open_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self.failures = 0  # in a row
        self.opened = 0  # times it opened, for logs and tests

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker whose time is up reads as half-open)."""
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self._open_s:
            return BreakerState.HALF_OPEN
        return self._state

    def allow(self) -> bool:
        """May a call go out now? An open breaker whose time is up lets one trial through."""
        state = self.state
        self._state = state
        return state is not BreakerState.OPEN

    def record_success(self) -> None:
        """A call worked: close."""
        self._state = BreakerState.CLOSED
        self.failures = 0

    def record_failure(self) -> None:
        """A call failed: open after the threshold, or at once if it was the trial."""
        self.failures += 1
        if self._state is BreakerState.HALF_OPEN or self.failures >= self._threshold:
            if self._state is not BreakerState.OPEN:
                self.opened += 1
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
