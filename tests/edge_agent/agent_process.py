"""Run the real ``edge-agent`` command as a subprocess that tests can SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from testrig.servers import free_port, port_is_open

REPO = Path(__file__).resolve().parents[2]


class AgentProcess:
    """``python -m edge_agent.cli`` with the contract flags, on a fixed HTTP port.

    ``module`` runs another entry point with the same flags (a test's variant of the agent).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        device_id: str,
        mqtt_url: str,
        db: Path,
        port: int | None = None,
        module: str = "edge_agent.cli",
        **flags: Any,
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.log_path = workdir / f"agent-{device_id}.log"
        self.args = [
            sys.executable, "-m", module,
            "--device-id", device_id,
            "--mqtt-url", mqtt_url,
            "--db", str(db),
            "--http-port", str(self.port),
            "--receipt-timeout-s", "2",
            "--reconnect-min-s", "0.05",
            "--reconnect-max-s", "0.5",
            "--poll-interval-s", "0.2",
            "--drain-rate-per-min", "600000",
            "--storage-retry-s", "0.2",
        ]  # fmt: skip
        for key, value in flags.items():
            self.args += [f"--{key.replace('_', '-')}", str(value)]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> None:
        """Start and wait until /healthz answers (200 or 503)."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"agent exited:\n{self.log_tail()}"
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1):
                    return
            except urllib.error.HTTPError:
                return  # 503 is an answer too: the agent is up and reporting
            except OSError:
                time.sleep(0.05)
        self.process.kill()  # or it outlives the test that gave up on it
        self.process.wait()
        raise AssertionError(f"agent did not come up:\n{self.log_tail()}")

    def sigkill(self) -> None:
        """SIGKILL, and prove it: the process is reaped and the port is closed."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        assert self.process.wait(10) == -signal.SIGKILL
        assert not port_is_open(self.port)

    def sigterm(self) -> int:
        """SIGTERM and the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(15)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
