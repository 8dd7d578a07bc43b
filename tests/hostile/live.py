"""Servers on real loopback ports, each on its own event loop in a thread, for sync clients.

Hypothesis and schemathesis drive synchronous HTTP; the agent and the orders API
are asyncio servers. Each runs in a thread with its own loop, so a generated
request goes through a real socket, aiohttp's parser and our middlewares.
"""

from __future__ import annotations

import asyncio
import http.client
import threading
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Final

STARTUP_TIMEOUT_S: Final = 20.0


class ServedInThread(threading.Thread):
    """Runs ``factory()`` (an async context manager yielding a port) until :meth:`stop`."""

    def __init__(self, factory: Callable[[], AbstractAsyncContextManager[int]], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._factory = factory
        self.port = 0
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None

    def run(self) -> None:
        """Serve until stopped; keep any startup error for :meth:`start_serving`."""
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the test thread, not lost in this one
            self.error = exc
            self.ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        async with self._factory() as port:
            self.port = port
            self.ready.set()
            await self._stop_event.wait()

    def start_serving(self) -> ServedInThread:
        """Start the thread and wait until the port is open."""
        self.start()
        assert self.ready.wait(STARTUP_TIMEOUT_S), f"{self.name} did not start"
        if self.error is not None:
            raise self.error
        return self

    def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._loop is not None and self._stop_event is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)
        self.join(15)

    def connection(self) -> http.client.HTTPConnection:
        """A keep-alive HTTP/1.1 connection to the server."""
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)


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
    """Counts cases and takes RSS after the warm-up tenth and at the end."""

    def __init__(self, cases: int) -> None:
        self.cases = cases
        self.count = 0
        self.warm_rss: int | None = None

    def tick(self) -> None:
        """Call once per generated case."""
        self.count += 1
        if self.count == max(1, self.cases // 10):
            self.warm_rss = rss_bytes()

    def growth(self) -> int:
        """RSS now minus RSS after warm-up."""
        assert self.warm_rss is not None, f"only {self.count} cases ran"
        return rss_bytes() - self.warm_rss
