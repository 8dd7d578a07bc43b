"""Fleet scale on this machine: peak connections, peak sustained orders/s, CPU split, latency.

Not a test. One local stack (Mosquitto, Redis, bridge, pipeline) and the
simulator in this process:

1. **Connections**: ``--connections`` devices connect (ramped) and hold; how
   many were connected at once, and the simulator's RSS per device.
2. **Peak throughput**: runs of ``--step-s`` seconds at rising rates with
   ``--devices`` devices; a rate is *sustained* when the run verifies (0 lost,
   0 duplicated), settles, and the devices saw terminal statuses for ≥ 90 %
   of the offered orders within the load window. CPU seconds per process
   group (broker, bridge, pipeline incl. workers, simulator) come from /proc.
3. **Latency vs load**: runs at 10 %, 25 %, 50 %, 75 %, 100 % of the peak;
   p50/p99 submit→receipt and submit→terminal status, with the p99 ratio
   against the 10 % baseline measured in the same invocation.

    .venv/bin/python bench/fleet_scale.py [--devices 1000] [--connections 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fleet.devices import Fleet, FleetSettings, raise_open_file_limit
from fleet.report import percentiles
from fleet.services import child_pids
from fleet.sim import SimOptions, SimResult, run
from fleet.stack import Stack, StackSettings
from fleet.tracker import Tracker
from servicekit.logs import configure_logging

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int | None) -> float:
    """utime + stime of ``pid`` and its children (live and reaped) in seconds."""
    if pid is None:
        return 0.0
    total = 0.0
    for p in (pid, *child_pids(pid)):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime, stime, cutime, cstime are fields 14–17 (1-based) of stat
        total += sum(int(f) for f in fields[11:15]) / CLK_TCK
    return total


def cpu_split(stack: Stack) -> dict[str, float]:
    """CPU seconds so far per process group."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "broker": cpu_s(stack.broker.pid),
        "bridge": sum(cpu_s(b.pid) for b in stack.bridges),
        "pipeline": cpu_s(stack.pipeline.pid),
        "redis": cpu_s(stack.redis.pid),
        "simulator": me.ru_utime + me.ru_stime,
    }


@dataclass
class Step:
    """One run at one offered rate."""

    rate: float
    result: SimResult
    processed_rate: float
    cpu: dict[str, float]
    wall_s: float

    @property
    def sustained(self) -> bool:
        """Verified, settled, and statuses kept up with ≥ 90 % of the offered rate."""
        return self.result.ok and self.result.settled and self.processed_rate >= 0.9 * self.rate


async def step(stack: Stack, devices: int, rate: float, seconds: float) -> Step:
    """One run at ``rate``; CPU measured around it."""
    before = cpu_split(stack)
    started = time.monotonic()
    options = SimOptions(devices=devices, rate=rate, duration_s=seconds, shards=4,
                         settle_timeout_s=120, ramp_per_s=1000)  # fmt: skip
    result = await run(options, stack)
    wall = time.monotonic() - started
    after = cpu_split(stack)
    in_window = [s for s in result.record.samples if s.t_s <= seconds + 0.5]
    processed = in_window[-1].processed if in_window else 0
    return Step(rate, result, processed / seconds, {k: after[k] - before[k] for k in after}, wall)


async def connections(url: str, count: int) -> tuple[int, float, float]:
    """Connect ``count`` idle devices; return (peak connected, seconds to connect, MB RSS each)."""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    settings = FleetSettings(count, url, prefix=f"conn{int(started)}", ramp_per_s=1000)
    async with Fleet(settings, Tracker()) as fleet:
        peak = await fleet.wait_connected(1.0, 120)
        took = time.monotonic() - started
        await asyncio.sleep(2)
        peak = max(peak, fleet.connected())
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak, took, (rss - rss_before) / 1024 / max(count, 1)


def show_step(s: Step) -> None:
    r = percentiles(s.result.record.receipt_latency_ms)
    e = percentiles(s.result.record.e2e_latency_ms)
    cpu = " ".join(f"{k}={v / s.wall_s:.2f}" for k, v in s.cpu.items())
    print(f"  offered {s.rate:7.0f}/s  processed {s.processed_rate:7.0f}/s  "
          f"receipt p50/p99 {r.get(50, 0):6.0f}/{r.get(99, 0):6.0f} ms  "
          f"e2e p50/p99 {e.get(50, 0):6.0f}/{e.get(99, 0):6.0f} ms  "
          f"{'sustained' if s.sustained else 'NOT sustained'}  cores: {cpu}",
          flush=True)  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    configure_logging("error", service="fleet-bench")
    raise_open_file_limit()
    with tempfile.TemporaryDirectory() as tmp, Stack(Path(tmp), StackSettings(shards=4)) as stack:
        print(f"devices={args.devices} step={args.step_s}s load={os.getloadavg()[0]:.1f}")
        peak_conn, took, mb = await connections(stack.mqtt_url, args.connections)
        print(f"connections: {peak_conn}/{args.connections} held at once "
              f"(connected in {took:.1f} s, {mb * 1024:.0f} KB RSS per device)")  # fmt: skip

        print("peak sustained throughput (cores = CPU s per wall s):")
        peak: Step | None = None
        rate = args.start_rate
        while rate <= args.max_rate:
            s = await step(stack, args.devices, rate, args.step_s)
            show_step(s)
            if not s.sustained:
                break
            peak = s
            rate *= 1.5
        if peak is None:
            print("no rate was sustained")
            return
        print(f"peak sustained: {peak.rate:.0f} orders/s end to end")

        print("latency vs load:")
        print(f"{'load':>6} {'rate/s':>7} {'rcpt p50':>9} {'rcpt p99':>9} {'e2e p50':>8} "
              f"{'e2e p99':>8} {'p99 vs 10%':>10}")  # fmt: skip
        baseline = None
        for share in (0.10, 0.25, 0.50, 0.75, 1.00):
            s = await step(stack, args.devices, peak.rate * share, args.step_s)
            r = percentiles(s.result.record.receipt_latency_ms)
            e = percentiles(s.result.record.e2e_latency_ms)
            baseline = baseline or e.get(99, 1.0)
            print(f"{share:6.0%} {s.rate:7.0f} {r.get(50, 0):9.0f} {r.get(99, 0):9.0f} "
                  f"{e.get(50, 0):8.0f} {e.get(99, 0):8.0f} {e.get(99, 0) / baseline:9.1f}x",
                  flush=True)  # fmt: skip


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwind, so the stack is stopped


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--step-s", type=float, default=15.0)
    parser.add_argument("--start-rate", type=float, default=200.0)
    parser.add_argument("--max-rate", type=float, default=5000.0)
    asyncio.run(main(parser.parse_args()))
