"""Wall-clock time as the contract stores it."""

from __future__ import annotations

import time


def now_ms() -> int:
    """Wall-clock ms since the Unix epoch."""
    return time.time_ns() // 1_000_000
