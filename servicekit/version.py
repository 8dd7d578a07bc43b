"""The release version of iot-orders, and ``--version`` for every command.

One source of truth: ``version`` in pyproject.toml. An installed package
(a wheel, or ``uv sync``'s editable install) carries it in its metadata; a
source tree run without installing (``PYTHONPATH=.``) reads pyproject.toml
itself. Release versions are semver (``0.2.0``); builds between releases
carry PEP 440's ``.devN`` suffix (``0.3.0.dev0``), which is how Python
packaging spells a semver pre-release and sorts before the release.
"""

from __future__ import annotations

import argparse
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Final

from schemas.names import CONTRACT_VERSION

DISTRIBUTION: Final = "iot-orders"
SOURCE_ROOT: Final = Path(__file__).resolve().parents[1]
UNKNOWN: Final = "0+unknown"
"""Neither installed nor in a source tree: a valid version that sorts below every release."""


def source_version(root: Path = SOURCE_ROOT) -> str:
    """The version in ``root/pyproject.toml`` when it is this project's, else :data:`UNKNOWN`."""
    try:
        project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    except (OSError, tomllib.TOMLDecodeError, KeyError):
        return UNKNOWN
    if project.get("name") != DISTRIBUTION or not isinstance(project.get("version"), str):
        return UNKNOWN
    return str(project["version"])


def package_version(distribution: str = DISTRIBUTION, root: Path = SOURCE_ROOT) -> str:
    """The installed package's version, or the source tree's when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return source_version(root)


def version_line(prog: str) -> str:
    """What ``--version`` prints: ``order-bridge 0.2.0 (contract v1)``."""
    return f"{prog} {package_version()} (contract v{CONTRACT_VERSION})"


def add_version_argument(parser: argparse.ArgumentParser) -> None:
    """``--version`` on ``parser``: print :func:`version_line` for its prog and exit 0."""
    parser.add_argument(
        "--version",
        action="version",
        version=version_line(parser.prog),
        help="print the release and the wire contract version, then exit; compare it with "
        "the ops page's versions during an upgrade",
    )
