"""Fixtures for the power-cut tests: a FUSE mount that can lose unsynced writes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testrig.powercut import PowerCutMount

# The bridge tests' fixture, shared: real order-bridge subprocesses, killed after the test.
from tests.bridge.conftest import bridge_factory  # noqa: F401

# Skips without /dev/fuse and root, fails so under CI=true (tests/tools.py).
needs_fuse = pytest.mark.usefixtures("fuse")


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[PowerCutMount]:
    """A power-cut filesystem mounted for this test, unmounted after it."""
    with PowerCutMount(tmp_path / "powercut") as mount:
        yield mount
