"""A TCP proxy in front of the broker, for network faults on a stack we did not start.

``fleet-sim`` puts it between the simulated devices and the broker, then drops
a fraction of the connections or refuses new ones for a while. It relays bytes
untouched (TLS passes through).

Blackhole mode (:meth:`TcpProxy.blackholing`, or :meth:`TcpProxy.set_blackhole`
from another thread) stands for a network partition: connections stay open and
new ones are accepted, but every byte either way is read and dropped, so the
peers see silence (timeouts), never a reset. The geo tests put it between a
bridge and another region's Redis.

``delay_s`` holds every chunk that long in each direction (a WAN: round trip
2 × delay_s), without limiting throughput: chunks queue, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import structlog

from .errors import ProxyError

log = structlog.get_logger(__name__)

CHUNK_BYTES = 64 * 1024
DELAY_QUEUE_CHUNKS = 1024


@dataclass
class ProxyStats:
    """What the proxy did, for the report."""

    accepted: int = 0
    refused: int = 0
    dropped: int = 0
    open: int = 0
    blackholed_bytes: int = 0  # read and thrown away while blackholing


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def close(self) -> None:
        for writer in (self.client, self.upstream):
            writer.transport.abort()


class TcpProxy:
    """Relays ``127.0.0.1:listen_port`` to ``upstream_host:upstream_port``.

    Use as ``async with TcpProxy(...) as proxy:``; ``proxy.port`` is where to connect.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_port: int = 0,
        seed: int = 0,
        delay_s: float = 0.0,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay_s = delay_s
        self.stats = ProxyStats()
        self._listen_port = listen_port
        self._links: set[_Link] = set()
        self._refusing = False
        self._blackhole = False
        self._random = random.Random(seed)
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The port clients connect to."""
        if self._server is None:
            raise RuntimeError("proxy not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self._listen_port)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
        self.drop(1.0)
        if self._server is not None:
            await self._server.wait_closed()

    def drop(self, fraction: float) -> int:
        """Abort ``fraction`` of the open connections (chosen at random); return how many."""
        links = [link for link in self._links if self._random.random() < fraction]
        for link in links:
            link.close()
        self.stats.dropped += len(links)
        log.info("proxy dropped connections", dropped=len(links), fraction=fraction)
        return len(links)

    @contextlib.asynccontextmanager
    async def refusing(self) -> AsyncIterator[None]:
        """While inside, new connections are closed at once (an outage); open ones live on."""
        self._refusing = True
        try:
            yield
        finally:
            self._refusing = False

    @property
    def blackhole(self) -> bool:
        """True while every byte is dropped (a partition, not a reset)."""
        return self._blackhole

    def set_blackhole(self, on: bool) -> None:
        """Start or end blackholing (a plain flag: safe to set from another thread)."""
        self._blackhole = on
        log.info("proxy blackhole", on=on)

    @contextlib.asynccontextmanager
    async def blackholing(self) -> AsyncIterator[None]:
        """While inside, connections stay open but carry nothing either way."""
        self.set_blackhole(True)
        try:
            yield
        finally:
            self.set_blackhole(False)

    def _forward(self, chunk: bytes) -> bool:
        """Whether ``chunk`` goes through; counts what the blackhole eats."""
        if self._blackhole:
            self.stats.blackholed_bytes += len(chunk)
            return False
        return True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._blackhole:
            # Accepted, never connected upstream: the client hears nothing, ever.
            self.stats.accepted += 1
            with contextlib.suppress(ConnectionError):
                while chunk := await reader.read(CHUNK_BYTES):
                    self._forward(chunk)
            writer.transport.abort()
            return
        if self._refusing:
            self.stats.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            self.stats.refused += 1
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        self.stats.accepted += 1
        self.stats.open = len(self._links)
        link.tasks = [
            asyncio.create_task(self._pipe(reader, up_writer), name="proxy-up"),
            asyncio.create_task(self._pipe(up_reader, writer), name="proxy-down"),
        ]
        try:
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            link.close()
            for task in link.tasks:
                task.cancel()
            await asyncio.gather(*link.tasks, return_exceptions=True)
            self._links.discard(link)
            self.stats.open = len(self._links)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.delay_s > 0:
            await _delayed_pipe(reader, writer, self._forward, self.delay_s)
            return
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(CHUNK_BYTES):
                if self._forward(chunk):
                    writer.write(chunk)
                    await writer.drain()


async def _delayed_pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    forward: Callable[[bytes], bool],
    delay_s: float,
) -> None:
    """Relay each chunk ``delay_s`` after it was read, in order, without stop-and-wait."""
    loop = asyncio.get_running_loop()
    # Bounded: at most DELAY_QUEUE_CHUNKS chunks in flight per direction, then reads wait.
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(DELAY_QUEUE_CHUNKS)

    async def send() -> None:
        while True:
            due, chunk = await queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not chunk:
                return
            if forward(chunk):
                writer.write(chunk)
                await writer.drain()

    sender = asyncio.create_task(send(), name="proxy-delay")
    try:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(CHUNK_BYTES):
                await queue.put((loop.time() + delay_s, chunk))
        await queue.put((loop.time() + delay_s, b""))  # EOF, after what came before it
        with contextlib.suppress(ConnectionError):
            await sender
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)


class ProxyThread:
    """A :class:`TcpProxy` on an event loop of its own thread, for synchronous callers
    (tests and benches whose own loop, if any, must not carry the proxy's traffic)."""

    def __init__(self, upstream_host: str, upstream_port: int, *, delay_s: float = 0.0) -> None:
        self.proxy = TcpProxy(upstream_host, upstream_port, delay_s=delay_s)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._run(),))
        self._thread.start()
        if not self._ready.wait(10):
            raise ProxyError("proxy did not start")

    async def _run(self) -> None:
        self._stop = asyncio.Event()
        async with self.proxy:
            self._ready.set()
            await self._stop.wait()
        # The proxy aborted its links; let their tasks finish before the loop closes.
        rest = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    def close(self) -> None:
        """Stop the proxy and its thread."""
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._loop.close()
