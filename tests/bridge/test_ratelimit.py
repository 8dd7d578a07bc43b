"""The per-device token bucket."""

from __future__ import annotations

from bridge.ratelimit import TokenBuckets


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refill() -> None:
    """A device gets its burst, is refused, and gets tokens back at the rate."""
    clock = FakeClock()
    buckets = TokenBuckets(rate_per_s=2, burst=3, clock=clock)
    assert [buckets.allow("d") for _ in range(4)] == [True, True, True, False]
    clock.now += 0.5
    assert buckets.allow("d")
    assert not buckets.allow("d")


def test_devices_are_independent() -> None:
    """One device's flood does not limit another."""
    buckets = TokenBuckets(rate_per_s=1, burst=1, clock=FakeClock())
    assert buckets.allow("a")
    assert not buckets.allow("a")
    assert buckets.allow("b")


def test_zero_rate_disables() -> None:
    """Rate 0 means no limit."""
    buckets = TokenBuckets(rate_per_s=0, burst=1, clock=FakeClock())
    assert all(buckets.allow("d") for _ in range(100))


def test_device_table_is_bounded() -> None:
    """Buckets beyond max_devices are evicted, oldest first."""
    buckets = TokenBuckets(rate_per_s=1, burst=1, max_devices=10, clock=FakeClock())
    for index in range(100):
        buckets.allow(f"d{index}")
    assert len(buckets._buckets) == 10
    assert "d99" in buckets._buckets
