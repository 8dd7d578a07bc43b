"""A pipeline still waiting for Redis at start stops on SIGTERM, and when orphaned.

At start every pipeline process agrees the deployment manifest with Redis and
waits while Redis is unreachable. That wait used to ignore ``stop``: a SIGTERM
(or a supervisor gone) left the process retrying until SIGKILL.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import PipelineConfig
from pipeline.service import SUPERVISOR_PID_ENV
from testrig.servers import free_port, port_is_open
from testrig.services import pid_alive
from tests.helpers import wait_until_blocking

from .processes import env_for, spawn

WAITING = "redis_unreachable_checking_manifest"


def unreachable_redis_env() -> dict[str, str]:
    """Settings whose Redis port has nothing listening (the fault, checked)."""
    port = free_port()
    assert not port_is_open(port)
    config = PipelineConfig(
        redis_url=f"redis://127.0.0.1:{port}/0", mqtt_url=f"mqtt://127.0.0.1:{free_port()}"
    )
    return env_for(config, backoff_max_s=0.2, http_port=free_port())


@pytest.mark.parametrize("command", ["worker", "run"])
def test_sigterm_stops_a_pipeline_waiting_for_redis(command: str, tmp_path: Path) -> None:
    log = tmp_path / "pipeline.log"
    process = spawn([command], unreachable_redis_env(), log)
    try:
        wait_until_blocking(lambda: WAITING in log.read_text(), 30, "waiting for Redis")
        process.terminate()
        assert process.wait(30) == 0, log.read_text()[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "stopped_before_start" in log.read_text()


def test_a_worker_orphaned_while_waiting_for_redis_stops(tmp_path: Path) -> None:
    """The worker's supervisor (here a shell that starts it and exits) is gone."""
    log = tmp_path / "worker.log"
    starter = subprocess.run(
        ["sh", "-c", f'{SUPERVISOR_PID_ENV}=$$ "$@" >"$LOG" 2>&1 & echo $!', "sh",
         sys.executable, "-m", "pipeline.cli", "worker"],
        env={**unreachable_redis_env(), "LOG": str(log)},
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    worker = int(starter.stdout)  # the shell has exited: the worker is orphaned
    try:
        wait_until_blocking(lambda: "supervisor_gone" in log.read_text(), 30, "supervisor_gone")
        wait_until_blocking(lambda: not pid_alive(worker), 30, "the orphan's exit")
    finally:
        if pid_alive(worker):
            subprocess.run(["kill", "-9", str(worker)], check=False)
    assert "stopped_before_start" in log.read_text()
