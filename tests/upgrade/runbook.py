"""The commands of a runbook page, read from its tested blocks.

A tested block is a fenced ``sh`` block right after the line
``<!-- tested: NAME -->``; the test runs it as written, with bash, the
variables the page names given in the environment.
"""

from __future__ import annotations

import re
from pathlib import Path

MARK = re.compile(r"<!-- tested: ([a-z][a-z0-9-]*) -->")
FENCE = "```sh"


def runbook_blocks(page: Path) -> dict[str, str]:
    """NAME → the block's text, for every tested block of ``page``.

    Raises:
        ValueError: a mark not followed by an ``sh`` block, an unclosed block, or a name twice.
    """
    lines = page.read_text().splitlines()
    blocks: dict[str, str] = {}
    for n, line in enumerate(lines):
        mark = MARK.fullmatch(line.strip())
        if mark is None:
            continue
        name = mark[1]
        if n + 1 >= len(lines) or lines[n + 1].strip() != FENCE:
            raise ValueError(f"{page}:{n + 1}: tested block {name!r} is not followed by {FENCE}")
        try:
            end = lines.index("```", n + 2)
        except ValueError:
            raise ValueError(f"{page}:{n + 1}: tested block {name!r} is not closed") from None
        if name in blocks:
            raise ValueError(f"{page}:{n + 1}: tested block {name!r} appears twice")
        blocks[name] = "\n".join(lines[n + 2 : end]) + "\n"
    return blocks
