"""fleet-sim at scale: devices over worker processes, a rate spike and a reconnect storm.

The short form (default run) spreads 300 devices over 2 worker processes and
runs ``spike`` and ``storm`` in one run against a real stack; ``FLEET_SLOW=1``
adds 2,000 devices over 4 processes. ``make demo-scale`` is the 10,000-device form.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from fleet.devices import FleetSettings
from fleet.report import rates
from fleet.sim import SimOptions, SimResult, run
from fleet.stack import Stack, StackSettings
from fleet.tracker import Tracker
from fleet.workers import split, worker_specs
from testrig.services import pid_alive


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One local stack (broker, Redis, bridge, pipeline) for the module's runs."""
    with Stack(tmp_path_factory.mktemp("stack"), StackSettings(shards=4)) as running:
        yield running


def test_split_spreads_devices_evenly_over_processes() -> None:
    """Slices cover every device once, differ by at most one, and none is empty."""
    assert split(10, 3) == [(0, 4), (4, 3), (7, 3)]
    assert split(2, 4) == [(0, 1), (1, 1)]
    specs = worker_specs(
        FleetSettings(10_000, "mqtt://127.0.0.1:1", "p", ramp_per_s=1000), 4, rate=100.0, seed=7,
        duration_s=1, catalog=None, redis_url="", settle_timeout_s=1, status_wait_s=1,
        connect_timeout_s=1, shards=4,
    )  # fmt: skip
    assert [s.fleet.first_index for s in specs] == [0, 2500, 5000, 7500]
    assert sum(s.rate for s in specs) == pytest.approx(100.0)
    assert {s.fleet.ramp_per_s for s in specs} == {250.0}
    assert len({s.seed for s in specs}) == 4


def test_a_receipt_and_a_status_that_beat_the_queued_answer_both_count() -> None:
    """On a busy loop the receipt and the terminal status can arrive before submit() returns."""
    tracker = Tracker()
    ref = ("dev-1", "order-0001")
    tracker.receipt(ref, "accepted")
    tracker.status(ref, "fulfilled")
    tracker.queued(ref, submitted_at=0.0)
    assert ref in tracker.receipted
    assert ref in tracker.terminal
    assert len(tracker.e2e_latency_ms) == 1


async def _spike_and_storm(stack: Stack, devices: int, processes: int) -> SimResult:
    rate, spike_at, factor, spike_s = 30.0, 1.0, 5.0, 3.0
    broker_before = stack.broker.pid
    options = SimOptions(
        devices=devices, processes=processes, rate=rate, duration_s=9.0, shards=4,
        chaos=f"{spike_at:g}:spike={factor:g}x:{spike_s:g}s,6:storm", settle_timeout_s=90,
        receipt_timeout_s=5.0, ramp_per_s=1000,
    )  # fmt: skip
    result = await run(options, stack)
    v = result.verdict
    # One coordinator, one verification: the devices really ran in the workers.
    assert len(result.worker_pids) == processes
    assert os.getpid() not in result.worker_pids
    assert not any(pid_alive(pid) for pid in result.worker_pids)
    assert result.settled, "the run did not reach quiescence"
    assert (v.lost, v.duplicated, v.stuck, v.unheard, v.processed_twice) == ([], {}, [], [], {})
    assert v.checked == result.record.samples[-1].submitted
    # The workers' timings reach the one report: the stage breakdown covers every order.
    stages = result.record.stages
    assert stages is not None
    assert stages.orders == len(result.record.e2e_latency_ms) == v.checked
    # The spike really raised the offered rate, and the outboxes drained after it.
    [spike] = result.chaos.spikes
    queued = rates(result.record.samples, "submitted")
    during = [r for s, r in zip(result.record.samples, queued, strict=True)
              if spike_at + 1 < s.t_s <= spike_at + spike_s]  # fmt: skip
    assert during, queued
    assert max(during) > 2 * rate, f"no spike in the queued rate: {queued}"
    assert spike.peak_depth >= spike.depth_before
    assert spike.drain_s is not None
    # The storm: the broker really restarted, every device came back, nothing was lost,
    # and the agents' full-jitter backoff spread the reconnects (no single 100 ms has them all).
    [storm] = result.chaos.storms
    assert stack.broker.pid != broker_before
    assert "gone" in next(label for _, label in result.record.events if label.startswith("storm"))
    assert storm.connected_before == devices
    assert storm.back == devices
    assert storm.all_back_s is not None
    assert storm.attempts >= devices
    assert storm.max_per_bucket < 0.6 * devices, storm.attempts_per_bucket
    assert storm.broker_cpu_s > 0
    return result


async def test_spike_and_storm_over_two_processes(stack: Stack) -> None:
    """300 devices in 2 worker processes: a ×5 spike and a storm lose nothing."""
    await _spike_and_storm(stack, devices=300, processes=2)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FLEET_SLOW"), reason="set FLEET_SLOW=1 (about 90 s)")
async def test_spike_and_storm_with_2000_devices_over_four_processes(stack: Stack) -> None:
    """The long form: 2,000 devices in 4 worker processes, the same spike and storm."""
    await _spike_and_storm(stack, devices=2_000, processes=4)
