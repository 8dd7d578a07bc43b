"""fleet-sim on the geo rig: real agents homed across regions, geo chaos, the geo verdict."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.geo.sim import GeoOptions, run_geo
from fleet.geo.stack import GeoStack
from testrig.servers import port_is_open

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


@pytest.mark.skipif(not GEO_SLOW, reason="GEO_SLOW=1: starts a second rig (three regions)")
def test_fleet_sim_stack_regions_prints_each_region_and_stops_on_sigterm() -> None:
    """`fleet-sim stack --regions 3` prints every region's URLs; SIGTERM stops all of them."""
    fleet_sim = str(Path(sys.executable).parent / "fleet-sim")
    with subprocess.Popen(
        [fleet_sim, "stack", "--regions", "3", "--shards", "2"], stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            lines = []
            while "Ctrl-C" not in (line := proc.stdout.readline()):
                assert line, "fleet-sim stack exited early"
                lines.append(line)
            urls = dict(line.strip().split(": ", 1) for line in lines)
            ports = [int(urls[f"{r} {p}"].rsplit(":", 1)[1].split("/")[0])
                     for r in ("eu", "us", "ap") for p in ("mqtt", "redis")]  # fmt: skip
            assert all(port_is_open(port) for port in ports)
            assert urls["agent @us"].startswith("edge-agent --region us=")
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            assert not any(port_is_open(port) for port in ports), "rig left running"
        finally:
            proc.kill()
