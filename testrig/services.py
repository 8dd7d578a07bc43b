"""Our own Python services (bridge, pipeline) as subprocesses, ready when /healthz says 200.

They share :class:`testrig.servers.ServerProcess`'s lifecycle (start, SIGTERM
stop, SIGKILL, restart on the same port); ``port`` is the service's HTTP port.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from .procstat import process_state
from .servers import ServerProcess


def console_script(name: str) -> str:
    """The installed console script ``name`` next to this interpreter (the venv's bin/)."""
    return str(Path(sys.executable).parent / name)


def http_ok(url: str, timeout_s: float = 0.5) -> bool:
    """True when ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (Linux /proc; empty elsewhere or when it is gone)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []
    out: list[int] = []
    for task in tasks:
        try:
            out.extend(int(p) for p in (task / "children").read_text().split())
        except OSError:
            continue
    return out


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    return process_state(pid) not in {"Z", "?"}


class ServiceProcess(ServerProcess):
    """One of our services: ``argv`` must make it listen for HTTP on ``port``."""

    def __init__(
        self, name: str, workdir: Path, argv: Sequence[str], *, port: int | None = None
    ) -> None:
        self.name = name
        super().__init__(workdir, port)
        self.argv = list(argv)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [*self.argv, "--http-port", str(self.port)]

    def is_ready(self) -> bool:
        return http_ok(f"{self.url}/healthz")
