"""Our services as real subprocesses on loopback ports, a keep-alive client, an RSS watch.

Hypothesis and schemathesis drive synchronous HTTP; every generated request goes
through a real socket, aiohttp's parser and our middlewares in the real process.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

STARTUP_TIMEOUT_S: Final = 60.0  # a bound for a server that never starts


class ServiceProcess:
    """One of our services as a real subprocess on a free port (its RSS is measured alone).

    Running the server in its own process keeps the generators' memory (hypothesis
    holds what it has generated) out of the server's RSS figure.
    """

    def __init__(self, argv: list[str], port: int, log_path: Path, env: dict[str, str]) -> None:
        self.port = port
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                cwd=Path(__file__).resolve().parents[2],
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"exited:\n{self.log_tail()}"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"no port {port} after {STARTUP_TIMEOUT_S} s:\n{self.log_tail()}")

    def rss(self) -> int:
        """The server's resident set size; fails if it died."""
        assert self.process.poll() is None, f"server died:\n{self.log_tail()}"
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+)", status)
        assert match is not None
        return int(match.group(1)) * 1024

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log."""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def rss_bytes() -> int:
    """This process's resident set size (Linux ``/proc``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class Answer:
    """One HTTP answer: status, lower-cased headers, body."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def content_type(self) -> str:
        """The media type without parameters."""
        return self.headers.get("content-type", "").split(";")[0].strip()


class HttpClient:
    """A keep-alive client that reconnects when the server closes the connection."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._conn: http.client.HTTPConnection | None = None

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """Send one request; a closed keep-alive connection is retried once on a new one."""
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=30)
            try:
                self._conn.request(method, path, body=body, headers=headers or {})
                response = self._conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, ConnectionError, http.client.BadStatusLine):
                self.close()
                if attempt == 2:
                    raise
                continue
            except BaseException:
                self.close()  # a half-sent request leaves the connection unusable
                raise
            answer = Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
            if response.will_close:
                self.close()
            return answer
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the connection (a new one opens on the next request)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class MemoryWatch:
    """Counts cases and takes a process's RSS after the warm-up tenth and at the end."""

    def __init__(self, cases: int, rss: Callable[[], int] | None = None) -> None:
        self.cases = cases
        self.count = 0
        self.warm_rss: int | None = None
        self.rss = rss or rss_bytes

    def tick(self) -> None:
        """Call once per generated case."""
        self.count += 1
        if self.count == max(1, self.cases // 10):
            self.warm_rss = self.rss()

    def growth(self) -> int:
        """RSS now minus RSS after warm-up."""
        assert self.warm_rss is not None, f"only {self.count} cases ran"
        return self.rss() - self.warm_rss
