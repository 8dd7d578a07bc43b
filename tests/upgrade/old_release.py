"""The previous tagged release, installed into a venv of its own from its own lock.

The release is the newest ``v*`` tag reachable from ``HEAD`` (``git describe
--tags --abbrev=0``). Its tree comes from ``git archive`` (no checkout of ours
changes) and is installed with ``uv sync --frozen`` from that tree's
``uv.lock``, as a wheel (``--no-editable``), into
``.releases/<commit>/venv``. The folder is git-ignored and keyed by the tag's
commit, so a rerun reuses the venv; the uv cache makes a first install quick
once ``make`` has filled it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.tools import unavailable

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".releases"
UV = REPO / ".uv" / "bin" / "uv"
TAG_PATTERN = "v[0-9]*"
# A clone without tags (CI checkouts often are) fetches this one.
FIRST_RELEASE = "v0.1.0"
EXTRAS = ("edge", "bridge")  # the services and the agent; no simulator, no dev tools
INSTALL_TIMEOUT_S = 600


@dataclass(frozen=True)
class Release:
    """A tagged release installed in its own venv."""

    tag: str
    commit: str
    venv: Path

    @property
    def bin(self) -> Path:
        """The venv's bin/, with ``order-bridge``, ``order-pipeline`` and ``edge-agent``."""
        return self.venv / "bin"


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False, timeout=120
    )


def previous_tag() -> str:
    """The newest release tag reachable from HEAD; fetches the first one if the clone lacks tags.

    Skips (fails under ``CI=true``) when there is none.
    """
    describe = ("describe", "--tags", "--abbrev=0", "--match", TAG_PATTERN)
    found = _git(*describe)
    if found.returncode != 0:
        _git("fetch", "--quiet", "origin", "tag", FIRST_RELEASE)
        found = _git(*describe)
    if found.returncode != 0:
        unavailable(f"no release tag reachable from HEAD ({found.stderr.strip()})")
    return found.stdout.strip()


def file_at(tag: str, path: str) -> str:
    """The text of ``path`` in the tree of ``tag``."""
    shown = _git("show", f"{tag}:{path}")
    if shown.returncode != 0:
        raise RuntimeError(f"git show {tag}:{path}: {shown.stderr}")
    return shown.stdout


def install(tag: str) -> Release:
    """The release ``tag`` in its venv, installed now unless a finished one is cached."""
    if not UV.exists():
        unavailable(f"{UV} is missing (make lint installs it)")
    commit = _git("rev-parse", f"{tag}^{{commit}}").stdout.strip()
    home = CACHE / commit
    home.mkdir(parents=True, exist_ok=True)
    release = Release(tag, commit, home / "venv")
    done = home / "installed"
    with (home / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once install once
        if not done.exists():
            shutil.rmtree(release.venv, ignore_errors=True)
            _install(commit, release.venv)
            done.write_text(f"{tag}\n")
    return release


def _install(commit: str, venv: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="release-") as tmp:
        tree = Path(tmp) / "tree"
        archive = Path(tmp) / "tree.tar"
        made = _git("archive", "--output", str(archive), commit)
        if made.returncode != 0:
            raise RuntimeError(f"git archive {commit}: {made.stderr}")
        with tarfile.open(archive) as tar:
            tar.extractall(tree, filter="data")
        env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(venv), "UV_PYTHON_DOWNLOADS": "never"}
        extras = [arg for extra in EXTRAS for arg in ("--extra", extra)]
        result = subprocess.run(
            [str(UV), "sync", "--frozen", "--no-dev", "--no-editable", *extras,
             "--python", "python3", "--quiet"],
            cwd=tree, env=env, capture_output=True, text=True, check=False,
            timeout=INSTALL_TIMEOUT_S,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"uv sync of {commit} failed:\n{result.stderr}")
