"""Services started and replaced with a runbook's own commands, and load offered to agents.

A :class:`Unit` is one replica (bridge, pipeline, agent) run as its runbook
block says, under ``bash`` with the release's ``bin/`` first on ``PATH`` and
the page's variables in the environment. Replacing it runs the page's
``stop`` block on its pid, then its start block with the new release.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testrig.services import pid_alive

STOP_TIMEOUT_S = 60
# Blocks run outside the repository: `python -c`/`-m` import from the working directory first.
NEUTRAL_CWD = "/"
READY_TIMEOUT_S = 90
ORDER = {"currency": "EUR", "items": [{"sku": "COLA-33", "qty": 1, "unit_price": 150}],
         "total": 150}  # fmt: skip


def run_block(block: str, env: Mapping[str, str], *, timeout_s: float = 60) -> str:
    """Run a runbook block with bash (errexit, pipefail); its stdout.

    Raises:
        AssertionError: the block failed, with its output.
    """
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], env=dict(env), capture_output=True,
        text=True, check=False, timeout=timeout_s, cwd=NEUTRAL_CWD,
    )  # fmt: skip
    assert result.returncode == 0, f"{block!r} exited {result.returncode}: {result.stderr}"
    return result.stdout


class Unit:
    """One replica: started from a runbook block, stopped with the page's ``stop``."""

    def __init__(self, name: str, start: str, env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.start_block = start
        self.env = dict(env)
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.path = os.environ["PATH"]
        self.release_bin = Path()
        self.log = log_dir / f"{name}.log"

    @property
    def pid(self) -> int:
        """The running process."""
        assert self.proc is not None, f"{self.name} is not running"
        return self.proc.pid

    def start(self, release_bin: Path, ready: str) -> None:
        """Start the block with ``release_bin`` first on PATH; wait with the ``ready`` block."""
        self.spawn(release_bin)
        self.wait_ready(ready)

    def spawn(self, release_bin: Path) -> None:
        """Start the block with ``release_bin`` first on PATH; don't wait."""
        self.release_bin = release_bin
        self.path = f"{release_bin}:{os.environ['PATH']}"
        self.starts += 1
        self.log = self.log_dir / f"{self.name}.{self.starts}.log"
        # A folder of its own as the working directory: `order-pipeline run` starts its workers
        # with `python -m`, which imports from the working directory first, so from the
        # repository's root an old release's workers would run this tree's code.
        workdir = self.log_dir / self.name
        workdir.mkdir(exist_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                ["bash", "-c", self.start_block], env={**self.env, "PATH": self.path},
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir,
            )  # fmt: skip

    def wait_ready(self, ready: str) -> None:
        """Run the ``ready`` block; the process must still be running after it."""
        run_block(ready, {**self.env, "PATH": self.path}, timeout_s=READY_TIMEOUT_S)
        assert self.proc is not None
        assert self.proc.poll() is None, f"{self.name} exited: see {self.log}"
        # bash ran the block's one command in its own place: the pid is the service, of this
        # release (a SIGTERM to it reaches the service, not a shell).
        argv = Path(f"/proc/{self.proc.pid}/cmdline").read_bytes().split(b"\0")
        assert any(arg.startswith(f"{self.release_bin}/".encode()) for arg in argv), argv

    def stop(self, stop: str) -> int:
        """Run the page's ``stop`` block on this replica; the exit code it ended with."""
        return stop_all([self], stop)[0]

    def kill(self) -> None:
        """SIGKILL whatever is still running (teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None


def stop_all(units: Sequence[Unit], stop: str) -> list[int]:
    """Run the page's ``stop`` block on each of ``units`` at once; their exit codes."""
    stoppers: list[subprocess.Popen[bytes]] = []
    for unit in units:
        env = {**unit.env, "PID": str(unit.pid)}
        stoppers.append(subprocess.Popen(["bash", "-euo", "pipefail", "-c", stop], env=env))
    codes: list[int] = []
    for unit, stopper in zip(units, stoppers, strict=True):
        proc = unit.proc
        assert proc is not None
        # The block waits until the pid is gone; reaping it here is what makes it go.
        codes.append(proc.wait(timeout=STOP_TIMEOUT_S))
        assert stopper.wait(timeout=STOP_TIMEOUT_S) == 0, f"stop block failed for {unit.name}"
        assert not pid_alive(proc.pid)
        unit.proc = None
    return codes


def http_json(url: str, body: Any = None, timeout_s: float = 5.0) -> tuple[int, Any]:
    """GET (or POST ``body`` as JSON); the status and the decoded answer (None when not JSON)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, raw = int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


@dataclass
class Load:
    """Orders offered to each agent's intake at a steady rate from one thread per agent.

    ``accepted``: (device_id, order_id) for each 202; an agent being replaced
    refuses connections, and those offers are counted in ``refused``.
    """

    agents: dict[str, int]  # device_id → intake port
    per_agent_per_s: float
    accepted: list[tuple[str, str]] = field(default_factory=list)
    refused: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        """One thread per agent."""
        for device_id, port in self.agents.items():
            thread = threading.Thread(target=self._offer, args=(device_id, port), daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        """Stop offering; wait for the threads."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _offer(self, device_id: str, port: int) -> None:
        interval = 1 / self.per_agent_per_s
        url = f"http://127.0.0.1:{port}/v1/orders"
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                status, answer = http_json(url, ORDER)
            except OSError:
                status, answer = 0, None
            with self._lock:
                if status == 202 and isinstance(answer, dict):
                    self.accepted.append((device_id, str(answer["order_id"])))
                else:
                    self.refused += 1
            next_at += interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))
