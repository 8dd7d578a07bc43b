"""A Docker engine for the deployment test: the running one, or a ``dockerd`` started here.

The engine started here uses the overlay2 storage driver (a container or a build step
shares its image's files; vfs copied all of them each time) and a data root of the test's
own, /var/lib/iot-orders-docker/<driver>, so its images outlive the test run and the
checkout (a new clone on the same machine builds nothing again), and no state of another
engine or driver is read: BuildKit's cache in a /var/lib/docker last used with vfs names
snapshots that overlay2 does not have, and every build failed ("stat
/var/lib/docker/overlay2/...: no such file or directory").
``DEPLOY_DOCKER_DATA_ROOT=DIR`` gives the test an engine of its own instead, all its
state under DIR (data root, exec root, pid file, socket), e.g. an empty DIR to time a
cold build beside the machine's engine.

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

# DEPLOY_DOCKER_DATA_ROOT=DIR: the engine of DIR (started here if it does not answer), never
# the machine's. A short DIR: containerd's socket under it must fit a socket path's 108 bytes.
OWN_ROOT: Final = os.environ.get("DEPLOY_DOCKER_DATA_ROOT")
# DEPLOY_DOCKER_STORAGE_DRIVER=vfs for a kernel without overlayfs (every layer a full copy).
STORAGE_DRIVER: Final = os.environ.get("DEPLOY_DOCKER_STORAGE_DRIVER", "overlay2")
DEFAULT_DATA_ROOT: Final = Path("/var/lib/iot-orders-docker") / STORAGE_DRIVER
START_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 30.0
DEBIAN_CLIENT: Final = "/usr/bin/docker"


@dataclass(frozen=True)
class Client:
    """A docker CLI and how it builds with BuildKit."""

    path: str
    buildx: bool
    host: str | None = None  # DOCKER_HOST, when not the default socket

    def build_argv(self) -> list[str]:
        """The start of a BuildKit build command that leaves the image in the engine."""
        if self.buildx:
            return [self.path, "buildx", "build", "--load"]
        return [self.path, "build"]

    def env(self) -> dict[str, str]:
        """The environment for this client's commands."""
        env = {**os.environ, "DOCKER_BUILDKIT": "1"}
        if self.host:
            env["DOCKER_HOST"] = self.host
        return env


def _runs(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60, env=env)


def own_root() -> Path | None:
    """DEPLOY_DOCKER_DATA_ROOT as an absolute path, or None for the machine's engine."""
    return Path(OWN_ROOT).resolve() if OWN_ROOT else None


def own_socket(root: Path) -> str:
    """The DOCKER_HOST of the engine whose state is all under ``root``."""
    return f"unix://{root / 'docker.sock'}"


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
    argv = [client.path, "info", "--format", "{{.ServerVersion}}"]
    return _runs(argv, client.env()).returncode == 0


class Engine:
    """``dockerd``, started when no engine answers; stopped by its pid. With ``root``, all
    its state is under that folder, apart from the machine's engine (which may run)."""

    def __init__(self, dockerd: str, log: Path, root: Path | None = None) -> None:
        self._argv = [dockerd, f"--storage-driver={STORAGE_DRIVER}"]
        if root is None:
            self._argv.append(f"--data-root={DEFAULT_DATA_ROOT}")
        else:
            self._argv += [
                f"--data-root={root / 'data'}", f"--exec-root={root / 'exec'}",
                f"--pidfile={root / 'docker.pid'}", f"--host={own_socket(root)}",
            ]  # fmt: skip
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
