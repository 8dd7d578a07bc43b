"""tests/tools.py: a missing requirement skips, and fails under CI=true."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import tools

REPO = Path(__file__).resolve().parents[1]
ABSENT = "no-such-tool-7f3a"


def test_a_missing_tool_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without CI=true, a missing tool is a skip that names it."""
    monkeypatch.setattr(tools, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match=f"{ABSENT} is not installed"):
        tools.require_tool(ABSENT)


def test_a_missing_tool_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under CI=true, the same missing tool fails the test."""
    monkeypatch.setattr(tools, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match=f"{ABSENT} is not installed.*CI=true"):
        tools.require_tool(ABSENT)
    with pytest.raises(pytest.fail.Exception, match="needs root"):
        tools.require(False, "needs root")


def test_a_present_tool_is_found() -> None:
    """An installed tool's path comes back; a met requirement does nothing."""
    assert Path(tools.require_tool("redis-server")).name == "redis-server"
    tools.require(True, "never shown")


@pytest.mark.parametrize(("value", "in_ci"), [("true", True), ("1", False), (None, False)])
def test_only_ci_true_means_ci(value: str | None, in_ci: bool) -> None:
    """IN_CI is read from the environment once: exactly CI=true."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if value is not None:
        env["CI"] = value
    out = subprocess.run(
        [sys.executable, "-c", "import tests.tools as t; print(t.IN_CI)"],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == str(in_ci)
