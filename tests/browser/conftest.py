"""Debian's chromium driven by playwright (never a downloaded browser), headless."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext, async_playwright

CHROMIUM: Path = Path(os.environ.get("OPS_CHROMIUM", "/usr/bin/chromium"))
# Without the networking flags chromium dials Google's hosts at start, which this
# sandbox refuses; --no-sandbox because tests may run as root.
CHROMIUM_FLAGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


@pytest.fixture
def chromium() -> Path:
    """Debian's chromium; fails (not skips) when missing: `make test` installs it."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} missing: run scripts/ensure-system-deps.sh (installs chromium)")
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path, tmp_path: Path) -> AsyncIterator[BrowserContext]:
    """A headless chromium with a fresh profile (its --user-data-dir) for this test."""
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            tmp_path / "chromium-profile",
            executable_path=chromium,
            headless=True,
            args=list(CHROMIUM_FLAGS),
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context
        finally:
            await context.close()
