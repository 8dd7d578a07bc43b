"""Locust's distributed mode with MQTT devices as users: 1 master + 2 workers, one verification.

Needs ``locust``: the ``loadtest`` extra, in the dev environment that ``make`` installs.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.stack import Stack, StackSettings
from testrig.servers import free_port

# Found, not imported: locust monkey-patches the standard library (gevent) on import.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("locust") is None,
    reason="needs locust: the loadtest extra (make installs it with the dev extra)",
)

VERDICT = (
    r"verification over (\d+) workers: ([\d,]+) accepted orders, "
    r"(\d+) lost, (\d+) duplicated, (\d+) stuck, (\d+) unheard -> (\w+)"
)
LOCUSTFILE = Path(__file__).resolve().parents[2] / "bench" / "locust_devices.py"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("stack"), StackSettings(shards=4)) as running:
        yield running


def test_one_master_two_workers_end_in_one_verification(stack: Stack) -> None:
    """Both workers' devices place orders; the master verifies their union and passes."""
    port = free_port()
    env = {**os.environ, "LOADGEN_REDIS_URL": stack.redis_url, "LOADGEN_SHARDS": "4",
           "LOADGEN_RUN": uuid.uuid4().hex[:6], "LOADGEN_WORKERS": "2",
           "LOADGEN_USER_RATE": "5", "LOADGEN_SETTLE_S": "30"}  # fmt: skip
    base = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE)]
    master = subprocess.Popen(
        [*base, "--master", "--headless", "--expect-workers", "2", "-u", "20", "-r", "20",
         "-t", "6s", "--host", stack.mqtt_url, "--master-bind-port", str(port),
         "--stop-timeout", "40", "--only-summary"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    workers: list[subprocess.Popen[bytes]] = [
        subprocess.Popen(
            [*base, "--worker", "--master-port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    try:
        out, _ = master.communicate(timeout=150)
    finally:
        for proc in workers:
            _stop(proc)
        _stop(master)
    found = re.search(VERDICT, out)
    assert found is not None, out[-3000:]
    workers_seen, orders, *faults, verdict = found.groups()
    assert workers_seen == "2"
    assert int(orders.replace(",", "")) > 100
    assert faults == ["0", "0", "0", "0"]
    assert verdict == "PASS"
    assert master.returncode == 0
    assert re.search(r"mqtt\s+receipt", out)  # the devices' latencies reached Locust's stats
    assert re.search(r"mqtt\s+status", out)


def _stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
