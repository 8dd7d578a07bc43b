"""The shared backoff helper: bounded windows, no overflow, reset after success."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from servicekit.backoff import Backoff, full_jitter


def test_survives_ten_thousand_consecutive_failures() -> None:
    backoff = Backoff(base_s=0.05, cap_s=2.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(10_000)]
    assert backoff.failures == 10_000
    assert all(0.0 <= d <= 2.0 for d in delays)
    # Past the cap the window stays the cap: the late draws spread over all of it.
    assert max(delays[-1000:]) > 1.5


def test_reset_starts_from_the_base_again() -> None:
    backoff = Backoff(base_s=0.01, cap_s=10.0, rng=random.Random(2))
    for _ in range(50):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() <= 0.01


@given(st.integers(min_value=-5, max_value=10**9), st.floats(0.0, 10.0), st.floats(0.0, 3600.0))
def test_window_is_bounded_for_any_attempt(attempt: int, base_s: float, cap_s: float) -> None:
    delay = full_jitter(attempt, base_s, cap_s, random.Random(attempt))
    assert 0.0 <= delay <= cap_s
