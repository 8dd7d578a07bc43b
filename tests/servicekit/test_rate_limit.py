"""The one token bucket (agent drain pacing) and its bounded per-key table (bridge limiter)."""

from __future__ import annotations

import tracemalloc

from servicekit.rate_limit import TokenBucket, TokenBuckets


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_bucket_paces_and_refunds() -> None:
    """The bucket hands out at most its burst at once and takes unused tokens back."""
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=1.0, burst=10, clock=clock)
    assert bucket.take_up_to(50) == 10
    assert bucket.take_up_to(5) == 0
    bucket.give_back(3)
    assert bucket.take_up_to(5) == 3
    assert bucket.seconds_until(2) == 2.0
    clock.now += 2
    assert bucket.take(2)
    assert not bucket.take(1)


def test_zero_rate_is_unlimited() -> None:
    """Rate 0 never refuses and never asks to wait (no division by zero)."""
    bucket = TokenBucket(rate_per_s=0, burst=1)
    assert bucket.take_up_to(1000) == 1000
    assert bucket.seconds_until(1000) == 0.0
    buckets = TokenBuckets(rate_per_s=0, burst=1, clock=FakeClock())
    assert all(buckets.allow("d") for _ in range(100))
    assert len(buckets) == 0


def test_burst_then_refill_per_key() -> None:
    """A key gets its burst, is refused, and gets tokens back at the rate."""
    clock = FakeClock()
    buckets = TokenBuckets(rate_per_s=2, burst=3, clock=clock)
    assert [buckets.allow("d") for _ in range(4)] == [True, True, True, False]
    clock.now += 0.5
    assert buckets.allow("d")
    assert not buckets.allow("d")


def test_keys_are_independent() -> None:
    """One key's flood does not limit another."""
    buckets = TokenBuckets(rate_per_s=1, burst=1, clock=FakeClock())
    assert buckets.allow("a")
    assert not buckets.allow("a")
    assert buckets.allow("b")


def test_table_evicts_the_least_recently_used() -> None:
    """Past max_keys the key unused longest goes; a key in use stays, and stays limited."""
    buckets = TokenBuckets(rate_per_s=1, burst=1, max_keys=10, clock=FakeClock())
    assert buckets.allow("busy")
    for index in range(100):
        assert not buckets.allow("busy")  # used every round: never evicted, still empty
        buckets.allow(f"d{index}")
    assert len(buckets) == 10
    assert "busy" in buckets
    assert "d99" in buckets
    assert "d0" not in buckets


def test_table_memory_is_flat_past_its_bound() -> None:
    """100k distinct 64-char ids into a table of 10k: memory after 100k ≈ after 10k."""
    buckets = TokenBuckets(rate_per_s=1, burst=1, max_keys=10_000, clock=FakeClock())
    ids = [f"{i:064d}" for i in range(100_000)]  # made before measuring
    tracemalloc.start()
    try:
        for device_id in ids[:10_000]:
            buckets.allow(device_id)
        at_bound, _ = tracemalloc.get_traced_memory()
        for device_id in ids[10_000:]:
            buckets.allow(device_id)
        at_end, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(buckets) == 10_000
    assert at_end < at_bound * 1.5, (at_bound, at_end)  # unbounded: 10x
    assert at_bound < 10_000 * 400  # under 400 B per bucket with its table slot
