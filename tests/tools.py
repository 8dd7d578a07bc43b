"""What a test needs from the machine: without it the test skips, or fails under ``CI=true``.

``make`` installs every system tool the tests use (scripts/ensure-system-deps.sh),
so in CI a missing tool, device or privilege is a broken setup: the test fails
and says what is missing. Elsewhere it skips with the same words. Skips behind
the slow variables (FLEET_SLOW, GEO_SLOW, POWERCUT_SLOW) are not for this
module: they name their variable in their reason.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Final, NoReturn

import pytest

from testrig.errors import ServerError
from testrig.servers import find_binary

IN_CI: Final = os.environ.get("CI") == "true"
# The power-cut filesystem (testrig/powercut) mounts through /dev/fuse as root.
HAS_FUSE: Final = Path("/dev/fuse").exists() and os.geteuid() == 0


def unavailable(what: str) -> NoReturn:
    """Skip the test for want of ``what``; under ``CI=true`` fail it instead."""
    if IN_CI:
        pytest.fail(f"{what} (CI=true: a missing requirement fails, it never skips)")
    pytest.skip(what)


def require(present: bool, what: str) -> None:
    """Go on if ``present``; otherwise :func:`unavailable` (skip, or fail in CI)."""
    if not present:
        unavailable(what)


def require_tool(name: str) -> str:
    """The path of the system tool ``name``; skips without it, fails under ``CI=true``."""
    with contextlib.suppress(ServerError):
        return find_binary(name)
    unavailable(f"{name} is not installed (scripts/ensure-system-deps.sh installs it)")
