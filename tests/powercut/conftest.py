"""Fixtures for the power-cut tests: a FUSE mount that can lose unsynced writes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleet.powercut import PowerCutMount
from tests.bridge.conftest import BridgeProcess

needs_fuse = pytest.mark.skipif(
    not Path("/dev/fuse").exists() or os.geteuid() != 0,
    reason="needs /dev/fuse and root (scripts/ensure-system-deps.sh installs fuse3)",
)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[PowerCutMount]:
    """A power-cut filesystem mounted for this test, unmounted after it."""
    with PowerCutMount(tmp_path / "powercut") as mount:
        yield mount


@pytest.fixture
def bridge_factory(tmp_path: Path) -> Iterator[Callable[..., BridgeProcess]]:
    """``order-bridge`` subprocesses; every one is killed at the end of the test."""
    made: list[BridgeProcess] = []

    def make(mqtt_url: str, redis_url: str, *extra: str) -> BridgeProcess:
        bridge = BridgeProcess(tmp_path, mqtt_url, redis_url, *extra)
        made.append(bridge)
        return bridge

    yield make
    for bridge in made:
        bridge.stop()
