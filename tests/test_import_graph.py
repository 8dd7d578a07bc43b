"""The import graph's fixed edges: the pipeline and the bridge never import each other."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Imports every module of one package, then prints the top-level packages loaded.
PROBE = """
import importlib, pkgutil, sys
package = importlib.import_module(sys.argv[1])
for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(module.name)
print(" ".join(sorted({name.partition(".")[0] for name in sys.modules})))
"""


@pytest.mark.parametrize(("package", "forbidden"), [("pipeline", "bridge"), ("bridge", "pipeline")])
def test_a_service_does_not_import_the_other(package: str, forbidden: str) -> None:
    """Loading every module of one service loads nothing of the other."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, package],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    loaded = result.stdout.split()
    assert package in loaded
    assert "schemas" in loaded
    assert forbidden not in loaded
