"""The intake DLQ's byte budget and the per-device dead-letter budget."""

from __future__ import annotations

from bridge.dlq_budget import (
    DEFAULT_DLQ_BYTES,
    ENTRY_MAX_BYTES,
    DeadLetterBudget,
    dlq_byte_budget,
    dlq_entries,
)


def test_the_byte_budget_comes_from_the_setting_then_maxmemory_then_a_default() -> None:
    """An explicit budget wins; else a 32nd of maxmemory; else 64 MiB."""
    assert dlq_byte_budget(10_000_000, 2 << 30) == 10_000_000
    assert dlq_byte_budget(0, 2 << 30) == 64 << 20
    assert dlq_byte_budget(0, 0) == DEFAULT_DLQ_BYTES


def test_entries_fit_the_byte_budget_and_never_exceed_maxlen() -> None:
    """2 GB maxmemory: 64 MiB of the largest entries; a lower maxlen caps it; never 0."""
    entries = dlq_entries(0, 2 << 30, 1_000_000)
    assert entries * ENTRY_MAX_BYTES <= 64 << 20 < (entries + 1) * ENTRY_MAX_BYTES
    assert dlq_entries(0, 2 << 30, 100) == 100
    assert dlq_entries(1, 0, 100) == 1


def test_a_device_spends_only_its_own_budget() -> None:
    """Ten letters at once per device; the eleventh is refused; another device is untouched."""
    budget = DeadLetterBudget(per_min=1.0, burst=10)
    assert [budget.allow("dev-a") for _ in range(11)] == [True] * 10 + [False]
    assert budget.allow("dev-b")
    assert [budget.allow(None) for _ in range(11)].count(True) == 10


def test_per_min_zero_stores_nothing_past_the_burst() -> None:
    """0 a minute is not "no limit": after the burst nothing more."""
    budget = DeadLetterBudget(per_min=0.0, burst=2)
    assert [budget.allow("dev-a") for _ in range(5)] == [True, True, False, False, False]
