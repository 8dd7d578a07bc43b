"""Every exported pattern is a valid ECMA-262 regex that matches whole strings only.

JSON Schema and OpenAPI patterns are ECMA-262, where ``\\Z`` does not exist; ours
end in ``(?![\\s\\S])`` (no character follows), which both Python and ECMA-262
read as end of string. Checked with Node's own RegExp when Node is installed.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.openapi import DOCUMENT_PATH
from schemas.json_schema import JSON_DIR
from tests.tools import require_tool

DOCUMENTS = [*sorted(JSON_DIR.glob("*.json")), DOCUMENT_PATH]
# A value each pattern accepts, so a trailing newline or NUL can be tried on it.
SAMPLES = ["EUR", "order-00000001", "dev-1", "cola", "1-1"]


def patterns(node: Any) -> Iterator[str]:
    """Every ``pattern`` value in a JSON document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                yield value
            else:
                yield from patterns(value)
    elif isinstance(node, list):
        for value in node:
            yield from patterns(value)


def all_patterns() -> list[str]:
    """The distinct patterns of every exported document."""
    found: set[str] = set()
    for path in DOCUMENTS:
        found |= set(patterns(json.loads(Path(path).read_text())))
    return sorted(found)


def test_every_pattern_is_anchored_at_both_ends_in_python() -> None:
    """In Python: no trailing newline or control character gets through any pattern."""
    assert all_patterns(), "no patterns found"
    for pattern in all_patterns():
        compiled = re.compile(pattern)
        accepted = [s for s in SAMPLES if compiled.search(s)]
        assert accepted, pattern
        for sample in accepted:
            for spike in ("\n", "\x00", "\r\n"):
                assert not compiled.search(sample + spike), (pattern, sample + spike)
                assert not compiled.search(sample[:1] + spike + sample[1:]), (pattern, spike)


def test_every_pattern_is_valid_ecma_262_with_the_same_meaning() -> None:
    """Node compiles each pattern with the u flag and agrees on what it accepts."""
    node = require_tool("node")
    cases = [
        (p, s + spike) for p in all_patterns() for s in SAMPLES for spike in ("", "\n", "\x00")
    ]
    script = (
        "const cases = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
        "console.log(JSON.stringify(cases.map(([p, s]) => new RegExp(p, 'u').test(s))));"
    )
    out = subprocess.run(
        [node, "-e", script], input=json.dumps(cases), capture_output=True, text=True, check=True
    )
    ecma = json.loads(out.stdout)
    python = [re.compile(p).search(s) is not None for p, s in cases]
    assert ecma == python
