"""Runbook pages whose shell blocks a test runs as written.

A docs page marks each block a test runs with an HTML comment on the line
before its fence (the site does not render it)::

    <!-- runbook: add-password -->
    ```sh
    redis-cli -e -h "$REDIS_HOST" …
    ```

The test reads the page, runs each named block with ``bash -euo pipefail``
in the environment the fixtures export (:data:`VARIABLES`, documented in
docs/how-to/index.md), and at the end checks it ran every marked block of the
page: a block added to a page without a test running it fails that test.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HOW_TO = REPO / "docs" / "how-to"

# The variables a runbook's blocks may read; the fixtures export the ones a page uses.
VARIABLES = (
    "REDIS_HOST", "REDIS_PORT", "REDIS_URL", "SECRETS_DIR", "BROKER_URL", "BROKER_HOST",
    "BROKER_PORT", "CERTS_DIR", "MOSQUITTO_PID", "REGISTRY", "SHARDS", "BRIDGE_URLS",
    "DEVICES_DIR", "DYNSEC_PLUGIN", "REGION", "NEW_REGION", "NEW_REGION_DIR", "NEW_REDIS_HOST",
    "NEW_REDIS_PORT", "NEW_BROKER_HOST", "NEW_BROKER_PORT", "NEW_BRIDGE_HOST", "NEW_BRIDGE_PORT",
    "NEW_API_HOST", "NEW_API_PORT", "NEW_HOME_DEVICES", "API_URL",
)  # fmt: skip

_BLOCK = re.compile(
    r"^[ \t]*<!-- runbook: (?P<name>[a-z0-9-]+) -->\n"
    r"(?P<indent>[ \t]*)```(?:sh|bash)\n(?P<body>.*?)\n(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
_MARKER = re.compile(r"<!-- runbook: ")
RUN_TIMEOUT_S = 60.0


def _path() -> str:
    """PATH with this venv's console scripts first, as on a host where they are installed."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


class RunbookError(AssertionError):
    """A block failed, or the page and its test disagree."""


@dataclass(frozen=True)
class Ran:
    """One block's run: its exit status and output."""

    name: str
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Runbook:
    """A page's named shell blocks, and which of them this test has run."""

    page: Path
    blocks: dict[str, str]
    ran: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, name: str) -> Runbook:
        """Read ``docs/how-to/<name>``; every marker must sit right above an sh fence."""
        page = HOW_TO / name
        text = page.read_text()
        blocks: dict[str, str] = {}
        for match in _BLOCK.finditer(text):
            if match["name"] in blocks:
                raise RunbookError(f"{name}: two blocks named {match['name']!r}")
            indent = match["indent"]
            lines = match["body"].split("\n")
            blocks[match["name"]] = "\n".join(line.removeprefix(indent) for line in lines)
        if len(blocks) != len(_MARKER.findall(text)):
            raise RunbookError(f"{name}: a runbook marker is not right above a ```sh fence")
        if not blocks:
            raise RunbookError(f"{name}: no runbook blocks")
        return cls(page, blocks)

    async def run(self, name: str, env: dict[str, str], cwd: Path, *, check: bool = True) -> Ran:
        """Run block ``name`` as written: ``bash -euo pipefail``, ``env`` over os.environ."""
        script = self.blocks.get(name)
        if script is None:
            raise RunbookError(f"{self.page.name} has no block {name!r}: {sorted(self.blocks)}")
        proc = await asyncio.create_subprocess_exec(
            "bash", "-euo", "pipefail", "-c", script,
            cwd=cwd, env={**os.environ, "PATH": _path(), **env},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(RUN_TIMEOUT_S):
            out, err = await proc.communicate()
        self.ran.append(name)
        ran = Ran(name, proc.returncode or 0, out.decode(errors="replace"),
                  err.decode(errors="replace"))  # fmt: skip
        if check and ran.returncode != 0:
            raise RunbookError(
                f"{self.page.name} block {name!r} exited {ran.returncode}:\n"
                f"{script}\n--- stdout\n{ran.stdout}\n--- stderr\n{ran.stderr}"
            )
        return ran

    def unrun(self) -> list[str]:
        """The page's blocks this test has not run (must be empty at the end)."""
        return sorted(set(self.blocks) - set(self.ran))
