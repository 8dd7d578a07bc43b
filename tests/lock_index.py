"""A package index on loopback made from uv.lock alone: uv resolves with no cache, no network.

Each locked package is served through the JSON simple API (PEP 691) with its locked files
and a core-metadata file (PEP 658) written from the lock's own dependency edges. The lock
does not record a release's Requires-Python, so it is taken from the installed copy where
the venv holds that very version (a lock forks on it: pymdown-extensions 13 needs 3.11.5).
Resolving against it reproduces the lock, which is all `uv lock --check` needs to tell
whether a changed pyproject.toml still matches. No wheel is ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PYPI_SIMPLE = "https://pypi.org/simple"
PYPI_FILES = "https://files.pythonhosted.org/packages/"


def _requirement(edge: dict[str, Any], extra: str | None = None) -> str:
    name = str(edge["name"])
    if edge.get("extra"):
        name += "[" + ",".join(edge["extra"]) + "]"
    markers = [m for m in (edge.get("marker"), extra and f"extra == '{extra}'") if m]
    return name + ("; " + " and ".join(f"({m})" for m in markers) if markers else "")


def requires_python(package: dict[str, Any]) -> str | None:
    """The Requires-Python of this locked release, if the venv has that release installed."""
    try:
        installed = importlib.metadata.metadata(package["name"])
    except importlib.metadata.PackageNotFoundError:
        return None
    if installed["Version"] != package["version"]:
        return None
    python = installed.json.get("requires_python")
    return python if isinstance(python, str) else None


def core_metadata(package: dict[str, Any], python: str | None) -> bytes:
    """The METADATA a wheel of this locked package would carry, as far as resolving needs."""
    lines = ["Metadata-Version: 2.1", f"Name: {package['name']}", f"Version: {package['version']}"]
    if python:
        lines.append(f"Requires-Python: {python}")
    lines += [f"Requires-Dist: {_requirement(edge)}" for edge in package.get("dependencies", [])]
    for extra, edges in package.get("optional-dependencies", {}).items():
        lines.append(f"Provides-Extra: {extra}")
        lines += [f"Requires-Dist: {_requirement(edge, extra)}" for edge in edges]
    return ("\n".join(lines) + "\n").encode()


class LockIndex:
    """The index's pages and metadata files, keyed by request path."""

    def __init__(self, lock: dict[str, Any], base_url: str) -> None:
        self.base_url = base_url
        self.pages: dict[str, tuple[str, bytes]] = {}
        files: dict[str, list[dict[str, Any]]] = {}  # a lock may hold two releases of a name
        for package in lock["package"]:
            if "wheels" not in package:
                continue  # the project itself
            python = requires_python(package)
            metadata = core_metadata(package, python)
            releases = files.setdefault(package["name"], [])
            if "sdist" in package:
                releases.append(self._file(package["sdist"], None, python))
            releases += [self._file(wheel, metadata, python) for wheel in package["wheels"]]
        for name, listed in files.items():
            page = {"meta": {"api-version": "1.1"}, "name": name, "files": listed}
            self.pages[f"/simple/{name}/"] = (
                "application/vnd.pypi.simple.v1+json",
                json.dumps(page).encode(),
            )

    def _file(
        self, locked: dict[str, Any], metadata: bytes | None, python: str | None
    ) -> dict[str, Any]:
        path = locked["url"].removeprefix(PYPI_FILES)
        algorithm, digest = locked["hash"].split(":", 1)
        entry = {
            "filename": path.rsplit("/", 1)[-1],
            "url": f"{self.base_url}/files/{path}",
            "hashes": {algorithm: digest},
            "size": locked.get("size"),
            "upload-time": locked.get("upload-time"),
            "requires-python": python,
        }
        if metadata is not None:
            self.pages[f"/files/{path}.metadata"] = ("application/octet-stream", metadata)
            entry["core-metadata"] = {"sha256": hashlib.sha256(metadata).hexdigest()}
        return entry

    def relocate(self, lock_text: str) -> str:
        """The lock as it reads when this index is where every locked package comes from."""
        return lock_text.replace(PYPI_SIMPLE, f"{self.base_url}/simple").replace(
            PYPI_FILES, f"{self.base_url}/files/"
        )


@contextmanager
def serve(lock: dict[str, Any]) -> Iterator[LockIndex]:
    """Serve the lock's index on a free loopback port for the duration of the block."""
    index: LockIndex | None = None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            assert index is not None
            path = self.path if self.path.endswith((".metadata", "/")) else self.path + "/"
            found = index.pages.get(path if path.startswith("/files/") else path.lower())
            if found is None:
                self.send_error(404)
                return
            content_type, body = found
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Handler) as server:
        index = LockIndex(lock, f"http://127.0.0.1:{server.server_address[1]}")
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield index
        finally:
            server.shutdown()
            thread.join()
