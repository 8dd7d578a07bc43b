"""The previous release, installed into a venv of its own from its own lock.

The release is :data:`PREVIOUS_RELEASE`, its tag and commit, kept here by the
release steps (docs/how-to/release.md): a clone of the branch alone has the
commit but no tags (CI's clone has none), so the commit is what counts; where
tags are present, the newest ``v*`` one reachable from ``HEAD`` must be the
same release. Its tree comes from ``git archive`` (no checkout of ours
changes) and is installed with ``uv sync --frozen`` from that tree's
``uv.lock``, as a wheel (``--no-editable``), into
``.releases/<commit>/venv``. The folder is git-ignored and keyed by the
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
from typing import Final

from tests.tools import unavailable

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".releases"
UV = REPO / ".uv" / "bin" / "uv"
TAG_PATTERN = "v[0-9]*"
# The release before this tree: (tag, commit). Release step 6 updates it.
PREVIOUS_RELEASE: Final = ("v0.1.0", "9b0574d23b6f4e427d42cae72bbaa4d68c2c4336")
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


def previous_release() -> Release:
    """:data:`PREVIOUS_RELEASE`, installed now unless a finished install is cached.

    Fails when the newest release tag reachable from ``HEAD`` (if the clone has
    tags) is another one: :data:`PREVIOUS_RELEASE` was not updated. Skips (fails
    under ``CI=true``) when the commit is not in the clone, even after a fetch.
    """
    tag, commit = PREVIOUS_RELEASE
    newest = _newest_tag("HEAD")
    if newest and _commit_of(newest) == _commit_of("HEAD"):
        newest = _newest_tag(f"{newest}^")  # HEAD is a release itself: the one before it
    if newest and newest != tag:
        raise AssertionError(
            f"the newest release tag is {newest}, but PREVIOUS_RELEASE names {tag}: "
            "update it (docs/how-to/release.md, step 6)"
        )
    if not _has_commit(commit):
        _git("fetch", "--quiet", "origin", commit)  # a shallow clone
    if not _has_commit(commit):
        unavailable(f"release {tag}'s commit {commit} is not in this clone")
    return install(tag, commit)


def _newest_tag(commit: str) -> str:
    """The newest release tag reachable from ``commit``; "" if there is none (or no tags)."""
    found = _git("describe", "--tags", "--abbrev=0", "--match", TAG_PATTERN, commit)
    return found.stdout.strip()


def _commit_of(ref: str) -> str:
    return _git("rev-parse", f"{ref}^{{commit}}").stdout.strip()


def _has_commit(commit: str) -> bool:
    return _git("cat-file", "-e", f"{commit}^{{commit}}").returncode == 0


def file_at(commit: str, path: str) -> str:
    """The text of ``path`` in the tree of ``commit``."""
    shown = _git("show", f"{commit}:{path}")
    if shown.returncode != 0:
        raise RuntimeError(f"git show {commit}:{path}: {shown.stderr}")
    return shown.stdout


def install(tag: str, commit: str) -> Release:
    """The release ``tag`` at ``commit`` in its venv, installed now unless a finished one is
    cached."""
    if not UV.exists():
        unavailable(f"{UV} is missing (make lint installs it)")
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
