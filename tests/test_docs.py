"""The docs site builds in strict mode, and the README's links stay inside the repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)[^`].*?\1", re.DOTALL)
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?", re.MULTILINE)
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:.*|//.*")


def markdown_links(text: str) -> list[str]:
    """Targets of inline links, images and reference definitions outside code."""
    prose = CODE_SPAN.sub("", FENCE.sub("", text))
    return INLINE_LINK.findall(prose) + REFERENCE_DEFINITION.findall(prose)


def build(config_dir: Path, site_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        check=False, cwd=config_dir, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site_dir = tmp_path_factory.mktemp("site")
    result = build(ROOT, site_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return site_dir


def test_every_page_is_built(site: Path) -> None:
    pages = [page for page in DOCS.rglob("*.md") if "hooks" not in page.parts]
    assert len(pages) > 20
    for page in pages:
        relative = page.relative_to(DOCS).with_suffix("")
        html = site / (relative.parent if relative.name == "index" else relative) / "index.html"
        assert html.is_file(), f"{page} was not built"


def test_http_api_page_renders_every_operation_and_schema(site: Path) -> None:
    document = json.loads((ROOT / "pipeline" / "openapi.json").read_text())
    html = (site / "reference" / "http-api" / "index.html").read_text()
    assert "<!-- openapi:" not in html
    for path, operations in document["paths"].items():
        for method in operations:
            assert f"{method.upper()} {path}" in html, (method, path)
    for name in document["components"]["schemas"]:
        assert f'id="schema-{name.lower()}"' in html, name


def test_strict_build_fails_on_a_broken_link(tmp_path: Path) -> None:
    """The strict build bites: one link to a missing page fails it and is named."""
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline", ignore=lambda *_: ["__pycache__"])
    index = tmp_path / "docs" / "index.md"
    index.write_text(index.read_text() + "\n[gone](tutorials/no-such-page.md)\n")

    result = build(tmp_path, tmp_path / "site")

    assert result.returncode != 0
    assert "no-such-page.md" in result.stdout + result.stderr


def test_readme_is_short() -> None:
    assert len(README.read_text().splitlines()) <= 150


def test_readme_links_resolve_inside_the_repository() -> None:
    links = markdown_links(README.read_text())
    assert any(link.startswith("docs/") for link in links), links
    for link in links:
        assert not SCHEME.fullmatch(link), f"README links outside the repository: {link}"
        path = link.split("#", 1)[0]
        if not path:
            continue
        target = (ROOT / path).resolve()
        assert target.is_relative_to(ROOT), f"README link leaves the repository: {link}"
        assert target.exists(), f"README link to a missing file: {link}"


def test_docs_never_link_outside_the_repository() -> None:
    for page in DOCS.rglob("*.md"):
        for link in markdown_links(page.read_text()):
            assert not SCHEME.fullmatch(link), f"{page.relative_to(ROOT)} links out: {link}"


def test_link_finder_sees_links_and_skips_code() -> None:
    text = "[a](docs/a.md) ![b](docs/b.png)\n`[c](c.md)`\n```\n[d](d.md)\n```\n[e]: docs/e.md\n"
    assert sorted(markdown_links(text)) == ["docs/a.md", "docs/b.png", "docs/e.md"]
