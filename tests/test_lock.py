"""The dependency lock: uv.lock matches pyproject.toml, and the pip exports match uv.lock."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests import lock_index

ROOT = Path(__file__).resolve().parents[1]
UV = ROOT / ".uv" / "bin" / "uv"
EXPORTS = ("edge", "bridge", "enrol", "fleet")


def uv(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "NO_COLOR": "1", **(env or {})}
    return subprocess.run(
        [str(UV), *args], check=False, cwd=cwd, env=full_env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _uv_is_installed() -> None:
    assert UV.exists(), "make installs uv into .uv/ from requirements/uv.txt"


def test_lock_is_current() -> None:
    result = uv("lock", "--check", "--offline")
    assert result.returncode == 0, result.stderr


def test_check_fails_when_pyproject_changes(tmp_path: Path) -> None:
    """`uv lock --check` catches an edited pyproject.toml, with no cache and no registry.

    The edited project must be re-resolved, which needs index pages that a cold machine has
    not cached; tests/lock_index.py serves them from uv.lock on loopback. The unedited run
    against the same index is the control: it passes, so the failure is the edit's doing.
    """
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    lock_text = (ROOT / "uv.lock").read_text()
    with lock_index.serve(tomllib.loads(lock_text)) as index:
        (tmp_path / "uv.lock").write_text(index.relocate(lock_text))
        isolated = {"UV_CACHE_DIR": str(tmp_path / "uv-cache"), "UV_NO_CONFIG": "1"}
        local_index = ("--default-index", f"{index.base_url}/simple")
        check = ("lock", "--check", *local_index)

        unedited = uv(*check, cwd=tmp_path, env=isolated)
        assert unedited.returncode == 0, unedited.stderr

        pyproject = tmp_path / "pyproject.toml"
        text = pyproject.read_text()
        assert '"msgspec>=0.19"' in text
        pyproject.write_text(text.replace('"msgspec>=0.19"', '"msgspec>=0.18"'))
        edited = uv(*check, cwd=tmp_path, env=isolated)
        assert edited.returncode != 0
        assert "needs to be updated" in edited.stderr, edited.stderr

        # The index reproduces the lock: re-locking changes the edited requirement and nothing else.
        relocked = uv("lock", *local_index, cwd=tmp_path, env=isolated)
        assert relocked.returncode == 0, relocked.stderr
        before = index.relocate(lock_text).splitlines()
        after = (tmp_path / "uv.lock").read_text().splitlines()

    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert changed == [
        (
            '    { name = "msgspec", specifier = ">=0.19" },',
            '    { name = "msgspec", specifier = ">=0.18" },',
        )
    ]


@pytest.mark.parametrize("extra", EXPORTS)
def test_pip_exports_match_the_lock(extra: str) -> None:
    """requirements/<extra>.txt is what `make lock` exports from uv.lock."""
    committed = (ROOT / "requirements" / f"{extra}.txt").read_text()
    result = uv(
        "export", "--frozen", "--no-dev", "--no-emit-project",
        "--extra", extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

    def pins(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith("#")]

    assert pins(result.stdout) == pins(committed), f"run `make lock`: {extra}.txt is stale"


def test_every_pin_carries_hashes() -> None:
    for extra in (*EXPORTS, "uv", "build"):
        lines = (ROOT / "requirements" / f"{extra}.txt").read_text().splitlines()
        pins = [line for line in lines if "==" in line]
        assert pins
        for pin in pins:
            assert pin.endswith("\\"), f"{extra}.txt: {pin} has no --hash"


def test_make_dist_builds_with_the_pinned_backend() -> None:
    """requirements/build.txt (`make dist`'s build constraints) pins what [build-system] needs."""
    build_system = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    pinned = (ROOT / "requirements" / "build.txt").read_text()
    for requirement in build_system["requires"]:
        name = requirement.split(">=")[0].split("==")[0].strip()
        assert f"\n{name}==" in pinned, f"run `make lock`: {name} is not pinned in build.txt"


def test_a_device_installs_only_the_edge_set() -> None:
    edge = (ROOT / "requirements" / "edge.txt").read_text()
    for cloud_only in ("redis==", "mqtt5==", "uvloop==", "cryptography=="):
        assert cloud_only not in edge
    for needed in ("msgspec==", "paho-mqtt==", "aiohttp=="):
        assert needed in edge


def test_an_operator_installs_only_the_enrol_set() -> None:
    """order-enrol installs without the load-test, broker-client or cloud extras."""
    enrol = (ROOT / "requirements" / "enrol.txt").read_text()
    for not_needed in ("redis==", "mqtt5==", "paho-mqtt==", "aiohttp==", "rich=="):
        assert not_needed not in enrol
    for needed in ("msgspec==", "cryptography=="):
        assert needed in enrol
