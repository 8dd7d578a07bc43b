"""Test helper: ``order-pipeline`` processes started as a deployment would, and killed for real."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from pipeline.config import PipelineConfig
from testrig.services import child_pids, pid_alive

# How long stop_all waits for the killed processes' own children (a supervisor's
# workers) to be gone.
REAP_S = 10.0


def env_for(config: PipelineConfig, **overrides: Any) -> dict[str, str]:
    """``ORDERS_*`` variables carrying ``config`` (plus overrides) to a child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERS_")}
    for name, value in {**msgspec.structs.asdict(config), **overrides}.items():
        if name == "consumer" and not value:
            continue
        # A repeatable setting (a tuple) travels as a comma list (servicekit.config).
        if isinstance(value, tuple):
            env[f"ORDERS_{name.upper()}"] = ",".join(value)
        else:
            env[f"ORDERS_{name.upper()}"] = (
                str(value).lower() if isinstance(value, bool) else str(value)
            )
    return env


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m pipeline.cli ARGS`` with its output in ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args], env=env, stdout=out, stderr=out
        )


def spawn_script(
    args: list[str], env: dict[str, str], log: Path, *, cwd: Path
) -> subprocess.Popen[bytes]:
    """Start the installed ``order-pipeline ARGS`` console script in ``cwd``, output in ``log``."""
    script = Path(sys.executable).parent / "order-pipeline"
    with log.open("ab") as out:
        return subprocess.Popen([str(script), *args], env=env, stdout=out, stderr=out, cwd=cwd)


def sigkill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL and prove it: the exit status says signal 9 and the pid is gone."""
    process.send_signal(signal.SIGKILL)
    assert process.wait(10) == -signal.SIGKILL
    with contextlib.suppress(ChildProcessError):
        os.waitpid(process.pid, os.WNOHANG)
    try:
        os.kill(process.pid, 0)
    except ProcessLookupError:
        return
    raise AssertionError(f"pid {process.pid} still exists after SIGKILL")


def descendants(pid: int) -> list[int]:
    """The children of ``pid``, their children, and so on (Linux /proc)."""
    found: list[int] = []
    todo = child_pids(pid)
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(child_pids(child))
    return found


def stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    """Kill whatever is still running, with the processes it started (teardown).

    A supervisor's (``run``) workers are killed with it and waited for: an orphaned
    worker drains for a while on the shared Redis and broker, and so took the next
    test's orders and its status queries.
    """
    orphans: list[int] = []
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGSTOP)  # a stopped supervisor starts no new worker
            children = descendants(process.pid)
            process.kill()
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            process.wait(10)
            orphans += children
    deadline = time.monotonic() + REAP_S
    while (alive := [pid for pid in orphans if pid_alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive, f"processes {alive} outlived SIGKILL for {REAP_S} s"
