"""The dependency lock: uv.lock matches pyproject.toml, and the pip exports match uv.lock."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UV = ROOT / ".uv" / "bin" / "uv"
EXPORTS = ("edge", "bridge", "enrol", "fleet")


def uv(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "NO_COLOR": "1"}
    return subprocess.run(
        [str(UV), *args], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module", autouse=True)
def _uv_is_installed() -> None:
    assert UV.exists(), "make installs uv into .uv/ from requirements/uv.txt"


def test_lock_is_current() -> None:
    result = uv("lock", "--check", "--offline")
    assert result.returncode == 0, result.stderr


def test_check_fails_when_pyproject_changes(tmp_path: Path) -> None:
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    pyproject = tmp_path / "pyproject.toml"
    text = pyproject.read_text()
    assert '"msgspec>=0.19"' in text
    pyproject.write_text(text.replace('"msgspec>=0.19"', '"msgspec>=0.20"'))

    result = uv("lock", "--check", "--offline", cwd=tmp_path)

    assert result.returncode != 0
    assert "needs to be updated" in result.stderr


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
    for extra in (*EXPORTS, "uv"):
        lines = (ROOT / "requirements" / f"{extra}.txt").read_text().splitlines()
        pins = [line for line in lines if "==" in line]
        assert pins
        for pin in pins:
            assert pin.endswith("\\"), f"{extra}.txt: {pin} has no --hash"


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
