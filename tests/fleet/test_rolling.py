"""fleet-sim's ``rolling-upgrade`` chaos kind on a stack of two bridges and two workers: each
restarted in turn under load, ending 0 lost, 0 duplicated, 0 stuck, 0 unheard.

The short form against one bridge and one worker is in ``test_sim.py`` (its
shared stack); this one starts a stack of its own, so it runs with FLEET_SLOW=1.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from fleet.sim import SimOptions, run
from fleet.stack import Stack, StackSettings

DEVICES = 200
RATE = 40.0
DURATION_S = 12.0


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FLEET_SLOW"), reason="set FLEET_SLOW=1 (about 40 s)")
async def test_rolling_upgrade_restarts_every_replica_and_loses_nothing(tmp_path: Path) -> None:
    """Two bridges and two workers, each replaced in turn mid-load; every replica's pid changes."""
    settings = StackSettings(shards=4, bridges=2, workers=2)
    with Stack(tmp_path / "stack", settings) as stack:
        bridges_before = [bridge.pid for bridge in stack.bridges]
        workers_before = set(stack.worker_pids())
        options = SimOptions(
            devices=DEVICES, rate=RATE, duration_s=DURATION_S, shards=4,
            chaos="1:rolling-upgrade", settle_timeout_s=90, receipt_timeout_s=3.0,
            status_wait_s=20,
        )  # fmt: skip
        result = await run(options, stack)
        bridges_after = [bridge.pid for bridge in stack.bridges]
        workers_after = set(stack.worker_pids())
    v = result.verdict
    assert v.checked > RATE * DURATION_S * 0.5, "too few orders to prove anything"
    assert result.settled, "the run did not reach quiescence"
    assert (v.lost, v.duplicated, v.stuck, v.unheard) == ([], {}, [], [])
    [(_, detail)] = result.record.events
    assert detail.startswith("rolling-upgrade")
    assert len(re.findall(r"bridge\d+ \d+ gone, now \d+", detail)) == 2, detail
    assert len(re.findall(r"worker \d+ gone", detail)) == 2, detail
    assert not set(bridges_before) & set(bridges_after)
    assert len(workers_before) == 2
    assert not workers_before & workers_after
