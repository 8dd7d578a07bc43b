"""A Docker engine for the deployment test: the running one, or a ``dockerd`` started here.

The engine started here uses the vfs storage driver (no overlay mount needed, slower
layers) and the default data root, /var/lib/docker, so its images outlive the test run
and the checkout: a new clone on the same machine builds nothing again.

The client must build with BuildKit, for ``RUN --mount=type=secret``: Docker 20.10's
``docker`` does with ``DOCKER_BUILDKIT=1``; from Docker 23 on, ``docker build`` needs the
buildx plugin for that, so a newer client without buildx is passed over for Debian's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

# DEPLOY_DOCKER_DATA_ROOT=DIR: another data root, e.g. an empty one to time a cold build.
DATA_ROOT: Final = Path(os.environ.get("DEPLOY_DOCKER_DATA_ROOT", "/var/lib/docker"))
START_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 30.0
DEBIAN_CLIENT: Final = "/usr/bin/docker"


@dataclass(frozen=True)
class Client:
    """A docker CLI and how it builds with BuildKit."""

    path: str
    buildx: bool

    def build_argv(self) -> list[str]:
        """The start of a BuildKit build command that leaves the image in the engine."""
        if self.buildx:
            return [self.path, "buildx", "build", "--load"]
        return [self.path, "build"]

    def env(self) -> dict[str, str]:
        """The environment for this client's commands."""
        return {**os.environ, "DOCKER_BUILDKIT": "1"}


def _runs(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)


def find_client() -> Client | None:
    """A docker CLI that builds with BuildKit: with buildx, or one older than Docker 23."""
    candidates = [shutil.which("docker"), DEBIAN_CLIENT]
    for path in dict.fromkeys(c for c in candidates if c and Path(c).exists()):
        if _runs([path, "buildx", "version"]).returncode == 0:
            return Client(path, buildx=True)
        version = _runs([path, "version", "--format", "{{.Client.Version}}"]).stdout
        major = re.fullmatch(r"(\d+)\..*", version.strip(), re.S)
        if major and int(major.group(1)) < 23:
            return Client(path, buildx=False)
    return None


def engine_answers(client: Client) -> bool:
    """True when a Docker engine answers this client."""
    return _runs([client.path, "info", "--format", "{{.ServerVersion}}"]).returncode == 0


class Engine:
    """``dockerd --storage-driver=vfs``, started when no engine answers; stopped by its pid."""

    def __init__(self, dockerd: str, log: Path) -> None:
        self._argv = [dockerd, "--storage-driver=vfs", f"--data-root={DATA_ROOT}"]
        self._log = log
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, client: Client) -> None:
        """Start dockerd and wait until it answers."""
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(
                self._argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not engine_answers(client):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self._log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"dockerd did not come up:\n{tail}")
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM dockerd (it stops its containers and containerd), and wait for it."""
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
