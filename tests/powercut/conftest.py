"""Fixtures for the power-cut tests: a FUSE mount that can lose unsynced writes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from testrig.powercut import PowerCutMount

# The bridge tests' fixture, shared: real order-bridge subprocesses, killed after the test.
from tests.bridge.conftest import bridge_factory  # noqa: F401

needs_fuse = pytest.mark.skipif(
    not Path("/dev/fuse").exists() or os.geteuid() != 0,
    reason="needs /dev/fuse and root (scripts/ensure-system-deps.sh installs fuse3)",
)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[PowerCutMount]:
    """A power-cut filesystem mounted for this test, unmounted after it."""
    with PowerCutMount(tmp_path / "powercut") as mount:
        yield mount
