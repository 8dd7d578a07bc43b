"""Test helper: ``order-pipeline`` processes started as a deployment would, and killed for real."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec

from pipeline.config import PipelineConfig


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


def stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    """Kill whatever is still running (teardown)."""
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(10)
