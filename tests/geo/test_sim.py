"""fleet-sim on the geo rig: real agents homed across regions, geo chaos, the geo verdict."""

from __future__ import annotations

import pytest

from fleet.geo_sim import GeoOptions, run_geo
from fleet.geo_stack import GeoStack

from .conftest import GEO_SLOW


async def test_failover_storm_every_device_of_a_region_fails_over_at_once(rig: GeoStack) -> None:
    """eu's broker dies with its devices connected: all fail over together; the verdict passes."""
    options = GeoOptions(
        devices=8, rate=8, duration_s=6, homes="eu", chaos="1:failover-storm=eu/3",
        failover_after_s=1.0, settle_timeout_s=60, status_wait_s=2,
    )  # fmt: skip
    result = await run_geo(options, rig)
    assert result.ok, "\n".join(result.lines())
    [(_, storm)] = result.chaos.events
    assert "gone" in storm, storm
    assert "connected 8 → 0" in storm, storm  # every device was on eu's broker when it died
    assert result.verdict.per_region["us"] > 0, "nothing was written in us during the storm"


@pytest.mark.skipif(not GEO_SLOW, reason="GEO_SLOW=1: a longer run with every geo fault")
async def test_fleet_run_with_every_geo_fault(rig: GeoStack) -> None:
    """Storm, region down and partition in one run: 0 lost, 0 duplicated, 0 stuck."""
    options = GeoOptions(
        devices=20, rate=20, duration_s=35, settle_timeout_s=120,
        chaos="3:failover-storm=eu/5,12:region-down=us/8,25:region-partition=eu|us/6",
    )  # fmt: skip
    result = await run_geo(options, rig)
    assert result.ok, "\n".join(result.lines())
    assert len(result.chaos.events) == 3
