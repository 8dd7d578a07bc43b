"""The import graph between our packages, read from the source (ast), is the one drawn in
docs/explanation/packages.md: the services never import the simulator or the test rig, the
pipeline and the bridge never import each other, enrolment installs without the simulator."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "explanation" / "packages.md"

# Which of our packages each package may import, besides itself. bench and tests may
# import every package; no package imports them.
ALLOWED: dict[str, frozenset[str]] = {
    "schemas": frozenset(),
    "servicekit": frozenset({"schemas"}),
    "edge_agent": frozenset({"schemas", "servicekit"}),
    "bridge": frozenset({"schemas", "servicekit"}),
    "pipeline": frozenset({"schemas", "servicekit"}),
    "enrolment": frozenset({"schemas", "servicekit"}),
    "testrig": frozenset(),
    "fleet": frozenset({"schemas", "servicekit", "edge_agent", "pipeline", "enrolment", "testrig"}),
}
OURS = frozenset({*ALLOWED, "bench", "tests"})
# Modules of an allowed package that a package still may not import.
FORBIDDEN_MODULES = {
    # servicekit.mqtt needs the mqtt5 codec, which only the cloud extras install.
    "edge_agent": ("servicekit.mqtt",),
}


def module_name(path: Path, root: Path) -> str:
    """``fleet/geo/sim.py`` → ``fleet.geo.sim``; a package's ``__init__.py`` → the package."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path) -> Iterator[str]:
    """Every module ``path`` imports, anywhere in the file (functions, TYPE_CHECKING
    blocks included), relative imports resolved to absolute names.

    ``from m import x`` yields ``m`` and ``m.x``: ``x`` may be a submodule
    (``from servicekit import mqtt``).
    """
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - (node.level - 1)] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            if node.module is not None:
                yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def our_imports(package: str, root: Path = REPO) -> list[tuple[str, str]]:
    """``(file, module)`` for each import by ``package`` of another package of ours."""
    found = []
    for path in sorted((root / package).rglob("*.py")):
        for module in imported_modules(path, root):
            top = module.split(".")[0]
            if top in OURS and top != package:
                found.append((path.relative_to(root).as_posix(), module))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_what_the_graph_allows(package: str) -> None:
    """No import of a package of ours outside the package's allowed set."""
    assert list((REPO / package).rglob("*.py")), f"{package}/ has no modules"
    wrong = [
        (path, module)
        for path, module in our_imports(package)
        if module.split(".")[0] not in ALLOWED[package]
    ]
    assert wrong == [], f"{package} may import only {sorted(ALLOWED[package])}"


@pytest.mark.parametrize("package", sorted(FORBIDDEN_MODULES))
def test_forbidden_modules_are_not_imported(package: str) -> None:
    """The edge agent never imports the cloud's MQTT client."""
    wrong = [
        (path, module)
        for path, module in our_imports(package)
        for forbidden in FORBIDDEN_MODULES[package]
        if module == forbidden or module.startswith(f"{forbidden}.")
    ]
    assert wrong == []


def test_the_scanner_resolves_relative_nested_and_type_checking_imports(tmp_path: Path) -> None:
    """Relative imports at any depth, imports inside functions and TYPE_CHECKING blocks
    are all seen, as absolute module names."""
    inner = tmp_path / "fleet" / "geo"
    inner.mkdir(parents=True)
    (tmp_path / "fleet" / "__init__.py").write_text("from . import stack\n")
    (inner / "__init__.py").write_text("")
    (inner / "sim.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from ..chaos import ChaosLog\n"
        "from .stack import GeoStack\n"
        "if TYPE_CHECKING:\n    from bridge.heartbeat import BRIDGES_KEY\n"
        "def later() -> None:\n    import testrig.servers\n"
    )
    assert set(imported_modules(inner / "sim.py", tmp_path)) == {
        "typing", "typing.TYPE_CHECKING", "fleet.chaos", "fleet.chaos.ChaosLog",
        "fleet.geo.stack", "fleet.geo.stack.GeoStack", "bridge.heartbeat",
        "bridge.heartbeat.BRIDGES_KEY", "testrig.servers",
    }  # fmt: skip
    assert list(imported_modules(tmp_path / "fleet" / "__init__.py", tmp_path)) == ["fleet.stack"]
    assert {module for _, module in our_imports("fleet", tmp_path)} == {
        "bridge.heartbeat", "bridge.heartbeat.BRIDGES_KEY", "testrig.servers",
    }  # fmt: skip
    (inner / "sim.py").write_text("from servicekit import mqtt\n")
    assert "servicekit.mqtt" in set(imported_modules(inner / "sim.py", tmp_path))


def drawn_arrows(text: str) -> set[tuple[str, str]]:
    """``A --> B`` lines of the page's Mermaid block: A imports B."""
    block = re.search(r"```mermaid\n(.*?)```", text, re.S)
    assert block is not None, "no Mermaid block"
    arrows = set()
    for line in block.group(1).splitlines():
        match = re.fullmatch(r"\s*(\w+)\s*-->\s*(\w+)\s*", line)
        if match:
            arrows.add((match.group(1), match.group(2)))
    return arrows


def test_the_drawn_graph_is_the_tested_graph() -> None:
    """docs/explanation/packages.md draws exactly the allowed arrows and names every package."""
    text = DOC.read_text()
    allowed = {(package, dep) for package, deps in ALLOWED.items() for dep in deps}
    assert drawn_arrows(text) == allowed
    for package in OURS:
        assert f"`{package}/`" in text, package
