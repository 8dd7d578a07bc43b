"""A scripted MQTT 5 "broker" on a loopback socket, for what Mosquitto won't do on demand.

Each accepted connection becomes a :class:`ScriptedSession`: the test reads the
packets the client sent (:meth:`ScriptedSession.expect`) and answers with
whatever bytes it likes, whole packets or pieces of them, in any order.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, Self, TypeVar

import mqtt5

P = TypeVar("P")
TIMEOUT_S = 10.0


class ScriptedSession(asyncio.Protocol):
    """One client connection as the test sees it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.packets: asyncio.Queue[Any] = asyncio.Queue()
        self.closed = asyncio.Event()
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self._buffer:
            try:
                packet, size = mqtt5.read(memoryview(bytes(self._buffer)))
            except IndexError:
                return
            del self._buffer[:size]
            self.packets.put_nowait(packet)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()

    async def next(self) -> Any:
        """The next packet the client sent."""
        async with asyncio.timeout(TIMEOUT_S):
            return await self.packets.get()

    async def expect(self, kind: type[P]) -> P:
        """The next packet, which must be a ``kind``."""
        packet = await self.next()
        assert isinstance(packet, kind), f"expected {kind.__name__}, got {packet!r}"
        return packet

    def send(self, *packets: Any) -> None:
        """Write whole packets in one write."""
        self.send_raw(b"".join(p.write() for p in packets))

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (a piece of a packet is fine)."""
        assert self.transport is not None
        self.transport.write(data)

    async def accept(
        self, *, session_present: bool = False, receive_max: int = 65535, suback: bool = True
    ) -> mqtt5.ConnectPacket:
        """Read CONNECT, answer CONNACK (and read SUBSCRIBE, answer SUBACK if ``suback``)."""
        connect = await self.expect(mqtt5.ConnectPacket)
        self.send(mqtt5.ConnAckPacket(session_present=session_present, receive_max=receive_max))
        if suback:
            await self.grant()
        return connect

    async def grant(self) -> mqtt5.SubscribePacket:
        """Read SUBSCRIBE and grant QoS 1 to every filter."""
        subscribe = await self.expect(mqtt5.SubscribePacket)
        codes = [mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE] * len(subscribe.topic_filters)
        self.send(mqtt5.SubAckPacket(subscribe.packet_id, codes))
        return subscribe

    def close(self) -> None:
        """Drop the connection."""
        if self.transport is not None:
            self.transport.abort()


class ScriptedBroker:
    """Listens on a free loopback port; hands each connection to the test."""

    def __init__(self, port: int = 0) -> None:
        self._port = port
        self._server: asyncio.Server | None = None
        self._sessions: asyncio.Queue[ScriptedSession] = asyncio.Queue()
        self._all: list[ScriptedSession] = []
        self.connections = 0

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _new_session(self) -> ScriptedSession:
        session = ScriptedSession()
        self.connections += 1
        self._all.append(session)
        self._sessions.put_nowait(session)
        return session

    async def session(self) -> ScriptedSession:
        """The next connection."""
        async with asyncio.timeout(TIMEOUT_S):
            return await self._sessions.get()

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_session, "127.0.0.1", self._port)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for session in self._all:
            session.close()
