"""TCP links that a partition blackholes: the geo rig's bridge → remote-Redis connections.

A :class:`Link` relays ``127.0.0.1:port`` to an upstream. :meth:`Link.blackhole`
stops relaying in one or both directions *without* closing anything: bytes
stay in the kernel buffers, the sender sees no error and no answer, as in a
real partition where packets vanish. New connections are accepted and held
the same way. :meth:`Link.heal` lets the held bytes flow on, in order, as TCP
retransmission would after a short partition; :meth:`Link.reset` aborts every
open connection instead (a partition longer than the peers' timeouts).

:class:`LinkHost` runs the links on an event loop in a daemon thread, so the
synchronous rig (:mod:`fleet.geo.stack`) and the chaos schedule (on the
simulator's loop) both drive them with plain calls.

This differs from :class:`testrig.proxy.TcpProxy`, which models device-side
faults (aborted and refused connections): a partition never says "no".
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

log = structlog.get_logger(__name__)

CHUNK_BYTES = 64 * 1024
_T = TypeVar("_T")


@dataclass
class LinkStats:
    """What a link did: connections accepted, open now, and aborted by :meth:`Link.reset`."""

    accepted: int = 0
    open: int = 0
    reset: int = 0
    refused: int = 0


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        self.client.transport.abort()
        if self.upstream is not None:
            self.upstream.transport.abort()


class Link:
    """One relay; create and drive it through :class:`LinkHost`."""

    def __init__(self, name: str, upstream: tuple[str, int], listen_port: int) -> None:
        self.name = name
        self.upstream = upstream
        self.listen_port = listen_port
        self.stats = LinkStats()
        # Set: bytes flow that way. Cleared: held (blackholed).
        self._up = asyncio.Event()
        self._down = asyncio.Event()
        self._up.set()
        self._down.set()
        self._conns: set[_Conn] = set()
        self._server: asyncio.Server | None = None

    @property
    def blackholed(self) -> bool:
        """True while either direction is held."""
        return not (self._up.is_set() and self._down.is_set())

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.listen_port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._reset()
        if self._server is not None:
            await self._server.wait_closed()

    def _blackhole(self, *, up: bool, down: bool) -> None:
        if up:
            self._up.clear()
        if down:
            self._down.clear()
        log.info("link blackholed", link=self.name, up=up, down=down)

    def _heal(self) -> None:
        self._up.set()
        self._down.set()
        log.info("link healed", link=self.name)

    def _reset(self) -> int:
        conns = list(self._conns)
        for conn in conns:
            conn.abort()
        self.stats.reset += len(conns)
        return len(conns)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer)
        self._conns.add(conn)
        self.stats.accepted += 1
        self.stats.open = len(self._conns)
        try:
            # A blackholed link never answers a new connection either (no connect upstream).
            await self._up.wait()
            try:
                up_reader, conn.upstream = await asyncio.open_connection(*self.upstream)
            except OSError:
                self.stats.refused += 1
                return
            conn.tasks = [
                asyncio.create_task(_pipe(reader, conn.upstream, self._up), name="link-up"),
                asyncio.create_task(_pipe(up_reader, writer, self._down), name="link-down"),
            ]
            await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            conn.abort()
            for task in conn.tasks:
                task.cancel()
            await asyncio.gather(*conn.tasks, return_exceptions=True)
            self._conns.discard(conn)
            self.stats.open = len(self._conns)


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flow: asyncio.Event
) -> None:
    with contextlib.suppress(ConnectionError):
        while True:
            # Held: read nothing, so the sender's bytes wait in its socket buffers.
            await flow.wait()
            chunk = await reader.read(CHUNK_BYTES)
            if not chunk:
                return
            await flow.wait()  # blackholed while we were reading: hold this chunk too
            writer.write(chunk)
            await writer.drain()


class LinkHost:
    """Owns an event loop thread and the links on it; ``with`` starts and stops it."""

    def __init__(self) -> None:
        self.links: dict[str, Link] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LinkHost:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the loop thread (idempotent)."""
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=serve, name="geo-links", daemon=True)
        self._thread.start()
        ready.wait()

    def stop(self) -> None:
        """Close every link and stop the loop thread."""
        if self._loop is None or self._thread is None:
            return
        for link in self.links.values():
            self._call_async(link.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
        self._loop = None
        self._thread = None

    def add(self, name: str, upstream: tuple[str, int], listen_port: int) -> Link:
        """Start a link listening on ``listen_port`` that relays to ``upstream``."""
        link = Link(name, upstream, listen_port)
        self._call_async(link.start())
        self.links[name] = link
        return link

    def blackhole(self, name: str, *, up: bool = True, down: bool = True) -> None:
        """Hold the link's bytes in the given directions (``up``: client → upstream)."""
        link = self.links[name]
        self._call(lambda: link._blackhole(up=up, down=down))

    def heal(self, name: str) -> None:
        """Let held bytes and new connections flow again."""
        link = self.links[name]
        self._call(link._heal)

    def reset(self, name: str) -> int:
        """Abort every open connection of the link; return how many."""
        link = self.links[name]
        return self._call(link._reset)

    def _call(self, fn: Callable[[], _T]) -> _T:
        if self._loop is None:
            raise RuntimeError("link host not started")
        future: Future[_T] = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller's thread
                future.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return future.result(5)

    def _call_async(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("link host not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(5)
