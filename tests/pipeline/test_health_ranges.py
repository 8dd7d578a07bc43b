"""Health figures outside their sane ranges are refused with a reason code."""

from __future__ import annotations

import pytest

from pipeline.health import MAX_OUTBOX_ROWS, MAX_UNRECEIPTED_AGE_MS, out_of_range
from schemas import Health

NOW = 1_765_000_000_000
HOUR = 3_600_000
I64_MAX = 2**63 - 1


def check(health: Health) -> str | None:
    return out_of_range(health, NOW, HOUR, 24 * HOUR)


@pytest.mark.parametrize(
    ("health", "reason"),
    [
        (Health(v=1, online=True, at=NOW, outbox_depth=3, oldest_unreceipted_age_ms=5), None),
        (Health(v=1, online=True, at=NOW + HOUR), None),
        (Health(v=1, online=True, at=NOW + HOUR + 1), "at_in_future"),
        (Health(v=1, online=True, at=I64_MAX), "at_in_future"),
        (Health(v=1, online=False, at=I64_MAX), "at_in_future"),
        (Health(v=1, online=True, at=NOW - 25 * HOUR - 1, outbox_depth=0), "at_too_old"),
        (Health(v=1, online=False, at=1), None),  # a Will: its CONNECT's time, any age
        (Health(v=1, online=True, at=NOW, outbox_depth=MAX_OUTBOX_ROWS + 1), "count_out_of_range"),
        (Health(v=1, online=True, at=NOW, held=I64_MAX), "count_out_of_range"),
        (Health(v=1, online=True, at=NOW, outbox_bytes=I64_MAX), "count_out_of_range"),
        (
            Health(v=1, online=True, at=NOW, oldest_unreceipted_age_ms=MAX_UNRECEIPTED_AGE_MS + 1),
            "age_out_of_range",
        ),
    ],
)
def test_each_figure_has_its_range(health: Health, reason: str | None) -> None:
    """The reason names the first figure out of range; a sane report has none."""
    assert check(health) == reason
