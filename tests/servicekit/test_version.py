"""The release version: one source (pyproject.toml), and ``--version`` on every command."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from schemas.names import CONTRACT_VERSION
from servicekit.version import UNKNOWN, package_version, source_version, version_line

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# A release is semver MAJOR.MINOR.PATCH; between releases main carries PEP 440's .devN.
RELEASE_OR_DEV = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(\.dev(0|[1-9]\d*))?")


def test_the_version_is_pyprojects_and_semver_shaped() -> None:
    """The installed metadata says what pyproject.toml says (re-run `make` when this fails)."""
    assert package_version() == PROJECT["version"]
    assert RELEASE_OR_DEV.fullmatch(PROJECT["version"])


def test_a_source_tree_that_is_not_installed_reads_pyproject(tmp_path: Path) -> None:
    """No installed distribution: pyproject.toml of this project, else a version below all."""
    assert package_version("iot-orders-not-installed", ROOT) == PROJECT["version"]
    assert package_version("iot-orders-not-installed", tmp_path) == UNKNOWN
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "other"\nversion = "9.9.9"\n')
    assert source_version(tmp_path) == UNKNOWN
    (tmp_path / "pyproject.toml").write_text("[project\n")
    assert source_version(tmp_path) == UNKNOWN


@pytest.mark.parametrize("command", sorted(PROJECT["scripts"]))
def test_every_command_prints_its_version(command: str) -> None:
    """`<command> --version`: its name, the release and the contract version; exit 0."""
    script = Path(sys.executable).parent / command
    result = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    expected = f"{command} {re.escape(PROJECT['version'])} \\(contract v{CONTRACT_VERSION}\\)\n"
    assert re.fullmatch(expected, result.stdout), result.stdout
    assert version_line(command) == result.stdout.strip()
