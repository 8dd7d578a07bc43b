"""`make dist`, and a device installing from its artefacts alone as deploy-agent.md says.

The install block of docs/how-to/deploy-agent.md runs as written, in a folder holding
nothing but `make dist`'s output, with only the venv's path moved under the test's
tmp_path. pip downloads the locked dependencies from its index: they are platform wheels,
which neither the repository nor `make dist` keeps, so the test needs the network (marker
`network`): without an index it skips, and under CI=true it fails (tests/tools.py).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from servicekit.version import package_version
from tests.tools import require

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "how-to" / "deploy-agent.md"
DOC_VENV = "/opt/edge-agent/venv"
_SH_BLOCK = re.compile(r"```sh\n(?P<body>.*?)```", re.DOTALL)

pytestmark = pytest.mark.network


def sh_blocks(markdown: str) -> list[str]:
    """The ```sh blocks of a page, in order."""
    return [m["body"] for m in _SH_BLOCK.finditer(markdown)]


def run(command: str | list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """A shell command (bash, stop at the first failure) or an argv; output captured."""
    argv = ["bash", "-euo", "pipefail", "-c", command] if isinstance(command, str) else command
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False, timeout=240)


def index_reachable(pip: Path, cwd: Path) -> bool:
    """``pip``, with its own configuration, reaches its package index."""
    probe = [str(pip), "index", "versions", "msgspec", "--disable-pip-version-check"]
    return pip.exists() and run(probe, cwd).returncode == 0


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make dist` into a fresh folder: its artefacts."""
    dist = tmp_path_factory.mktemp("dist")
    made = run(["make", "-s", "dist", f"DIST={dist}"], ROOT)
    assert made.returncode == 0, made.stdout + made.stderr
    return dist


def test_dist_holds_the_wheel_the_locked_requirements_and_their_sums(release: Path) -> None:
    """One wheel and one sdist of this version, requirements/edge.txt, and a SHA256SUMS
    that `sha256sum -c` accepts and that catches a changed byte."""
    version = package_version()
    wheel = f"iot_orders-{version}-py3-none-any.whl"
    names = {p.name for p in release.iterdir()} - {".gitignore"}
    assert names == {wheel, f"iot_orders-{version}.tar.gz", "requirements-edge.txt", "SHA256SUMS"}
    assert (release / "requirements-edge.txt").read_text() == (
        ROOT / "requirements" / "edge.txt"
    ).read_text()
    sums = {
        name: digest
        for digest, name in (
            line.split("  ", 1) for line in (release / "SHA256SUMS").read_text().splitlines()
        )
    }
    assert set(sums) == names - {"SHA256SUMS"}
    for name, digest in sums.items():
        assert hashlib.sha256((release / name).read_bytes()).hexdigest() == digest, name
    assert run("sha256sum -c SHA256SUMS", release).returncode == 0

    tampered = release.parent / "tampered"
    shutil.copytree(release, tampered, dirs_exist_ok=True)
    data = bytearray((tampered / wheel).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tampered / wheel).write_bytes(bytes(data))
    check = run("sha256sum -c SHA256SUMS", tampered)
    assert check.returncode != 0
    assert f"{wheel}: FAILED" in check.stdout


def test_a_device_installs_from_the_release_without_a_source_tree(
    release: Path, tmp_path: Path
) -> None:
    """The guide's install block, as written, in a folder of the artefacts: the agent runs
    `--version` with this release, and the example config and unit came with the wheel."""
    device = tmp_path / "device"
    shutil.copytree(release, device)
    (device / f"iot_orders-{package_version()}.tar.gz").unlink()  # a device needs no sdist
    install, service = sh_blocks(GUIDE.read_text())[:2]
    venv = tmp_path / "venv"
    block = install.replace(DOC_VENV, str(venv)).replace("python3 -m", f"{sys.executable} -m")
    assert block != install
    done = run(block, device)
    if done.returncode != 0:
        require(
            index_reachable(venv / "bin" / "pip", device),
            "pip cannot reach its package index (the device's locked requirements come from it)",
        )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == f"edge-agent {package_version()} (contract v1)"

    pkg_line = next(line for line in service.splitlines() if line.startswith("pkg="))
    found = run(pkg_line.replace(DOC_VENV, str(venv)) + '\necho "$pkg"', device)
    assert found.returncode == 0, found.stderr
    pkg = Path(found.stdout.strip())
    assert pkg.is_relative_to(venv)
    assert (pkg / "agent.toml.example").is_file()
    assert DOC_VENV in (pkg / "edge-agent.service").read_text()  # the unit runs this venv's agent
