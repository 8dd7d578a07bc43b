"""The local stack: every part real, controllable, and the verdict's exit status."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from fleet.chaos import ChaosLog
from fleet.report import RunRecord
from fleet.runner import print_result
from fleet.sim import SimResult
from fleet.stack import Stack, StackSettings
from fleet.verify import Verdict
from testrig.servers import port_is_open
from testrig.services import http_ok, pid_alive


def test_stack_parts_answer_and_a_killed_worker_is_replaced(tmp_path: Path) -> None:
    """Broker, Redis, bridge and pipeline come up; a SIGKILLed worker gets a successor."""
    with Stack(tmp_path, StackSettings(shards=2)) as stack:
        # One request each, with time to answer on a busy machine (http_ok's default is 0.5 s).
        assert http_ok(stack.bridges[0].url + "/healthz", timeout_s=10)
        assert http_ok(stack.pipeline.url + "/healthz", timeout_s=10)
        killed = stack.kill_worker()
        assert killed is not None
        deadline = time.monotonic() + 20
        while (pid_alive(killed) or not stack.worker_pids()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(killed)
        assert stack.worker_pids()
        assert killed not in stack.worker_pids()
        pids = [stack.broker.pid, stack.redis.pid, stack.bridges[0].pid, stack.pipeline.pid]
    assert not any(pid_alive(p) for p in pids if p is not None), "stack left processes behind"


def test_lost_or_duplicated_orders_fail_the_run(tmp_path: Path) -> None:
    """A verdict with a lost order exits 1 and names the order; a clean one exits 0."""
    console = Console(record=True, width=200)
    bad = Verdict(checked=2, lost=[("dev-1", "order-0001")])
    record = RunRecord(devices=1, rate=1.0, duration_s=1.0, verdict=bad)
    assert print_result(SimResult(record, bad, True, ChaosLog()), tmp_path / "a.html", console) == 1
    assert "dev-1/order-0001" in console.export_text()
    good = Verdict(checked=2)
    record = RunRecord(devices=1, rate=1.0, duration_s=1.0, verdict=good)
    assert (
        print_result(SimResult(record, good, True, ChaosLog()), tmp_path / "b.html", console) == 0
    )
    assert (tmp_path / "b.html").exists()


def test_fleet_sim_stack_command_stops_everything_on_sigterm() -> None:
    """`fleet-sim stack` prints its URLs; SIGTERM stops every process it started."""
    fleet_sim = str(Path(sys.executable).parent / "fleet-sim")
    with subprocess.Popen(
        [fleet_sim, "stack", "--shards", "2"], stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            lines = []
            while "Ctrl-C" not in (line := proc.stdout.readline()):
                assert line, "fleet-sim stack exited early"
                lines.append(line)
            urls = dict(line.strip().split(": ", 1) for line in lines)
            ports = [int(urls[n].rsplit(":", 1)[1].split("/")[0]) for n in ("mqtt", "redis")]
            assert all(port_is_open(port) for port in ports)
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            assert not any(port_is_open(port) for port in ports), "stack left running"
        finally:
            proc.kill()
