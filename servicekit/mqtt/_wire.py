"""One TCP connection to the broker: packets in (parked past the Receive Maximum), writes out.

The socket is always read: PUBACKs and PINGRESPs must be heard whatever the
handlers are doing. Incoming PUBLISH packets beyond the client's Receive
Maximum of unacked messages, or while its owner paused reading, are parked
unhandled. A compliant broker sends no more than the Receive Maximum, but
Mosquitto 2.0 answers a PUBACK with more than it freed; so past
``PARKED_MAX_BYTES`` parked, our PUBACKs are held back (the window still moves
on our side, so parked messages keep reaching their handlers) until the
parking is down to half of it: a broker that gets no PUBACK sends nothing new.
A broker that sends past the Receive Maximum regardless, beyond
``PARKED_DISCONNECT_BYTES``, gets DISCONNECT 0x93.
Outgoing bytes queued in one loop turn leave in one
``transport.write``; nothing new is queued while the transport's buffer is
above ``WRITE_HIGH_WATER``.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import TYPE_CHECKING, Final, cast

import mqtt5
import structlog

if TYPE_CHECKING:
    from ._client import MqttClient

log = structlog.get_logger(__name__)

_PUBACK: Final = 0x40  # the fixed header's first byte (type 4, no flags)
_PUBACK_OK: Final = frozenset({0x00, 0x10})  # success, no matching subscribers
WRITE_HIGH_WATER: Final = 256 * 1024
PARKED_MAX_BYTES: Final = 1024 * 1024
"""Parked bytes past which our PUBACKs are held back (until half of it is left)."""
PARKED_DISCONNECT_BYTES: Final = 16 * PARKED_MAX_BYTES
"""Parked bytes past our Receive Maximum at which the broker is disconnected (0x93)."""


class Wire(asyncio.Protocol):
    """One TCP connection: frames packets in, coalesces writes out, counts unacked input."""

    def __init__(self, owner: MqttClient) -> None:
        self._owner = owner
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.Event()
        self.last_heard = 0.0
        self.unacked = 0  # messages handed to handlers on this connection, not yet acked
        # PUBLISHes read past the Receive Maximum, handed out in order once acks free room.
        self.parked: deque[tuple[mqtt5.PublishPacket, int]] = deque()
        self.parked_bytes = 0
        # PUBACKs held back while too much is parked; sent once the parking drains.
        self.held_acks: list[bytes] = []
        self.holding_acks = False
        self.writing_paused = False
        # Receive Maximum reached: parsing stops until half the window is acked
        # (hysteresis, so reads don't flap on every ack).
        self.input_blocked = False
        self.out_bytes = 0  # queued for this loop turn's write

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # Nagle + delayed ACK would add ~40 ms per small packet
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.last_heard = asyncio.get_running_loop().time()

    def data_received(self, data: bytes) -> None:
        self.last_heard = asyncio.get_running_loop().time()
        self._buffer += data
        self.process()

    def process(self) -> None:
        """Hand out parked messages the window now allows, then handle the buffer's packets."""
        owner = self._owner
        while self.parked and not owner._input_full(self):
            parked, parked_size = self.parked.popleft()
            self.parked_bytes -= parked_size
            owner._on_packet(self, parked)
        if self.holding_acks and self.parked_bytes <= PARKED_MAX_BYTES // 2:
            self.holding_acks = False
            for ack in self.held_acks:
                self.send(ack)
            self.held_acks.clear()
        offset = 0
        exceeded = False
        with memoryview(self._buffer) as view:
            end = len(view)
            while offset < end:
                if view[offset] == _PUBACK and (taken := self._puback(view, offset, end)):
                    offset += taken
                    continue
                try:
                    packet, size = mqtt5.read(view[offset:])
                except IndexError:  # an incomplete packet: wait for more bytes
                    break
                except ValueError as exc:
                    log.error("malformed packet from broker, closing", error=str(exc))  # noqa: TRY400
                    self.abort()
                    return
                offset += size
                if isinstance(packet, mqtt5.PublishPacket) and (
                    self.parked or owner._input_full(self)
                ):
                    if self._park(packet, size):
                        exceeded = True
                        break
                else:
                    owner._on_packet(self, packet)
        if exceeded:
            self._buffer.clear()
            owner._receive_maximum_exceeded(self)
        else:
            del self._buffer[:offset]

    def _puback(self, view: memoryview, offset: int, end: int) -> int:
        """Handle the PUBACK at ``offset`` if it is a common one; its size, or 0.

        A status-sending client reads a PUBACK per message: those without properties
        and with code 0x00 or 0x10 (MQTT 5 §3.4.2) are read here, without building a
        packet object. Anything else, or an incomplete one, goes to the codec.
        """
        if offset + 4 > end:
            return 0
        length = view[offset + 1]
        if length == 2:
            code = 0
        elif length == 3 and offset + 5 <= end and view[offset + 4] in _PUBACK_OK:
            code = view[offset + 4]
        else:
            return 0
        self._owner._on_puback_ok((view[offset + 2] << 8) | view[offset + 3], code)
        return 2 + length

    def _park(self, packet: mqtt5.PublishPacket, size: int) -> bool:
        """Park ``packet``; True if the broker is past our Receive Maximum and too far."""
        self.parked.append((packet, size))
        self.parked_bytes += size
        if self.parked_bytes >= PARKED_MAX_BYTES and not self.holding_acks:
            self.holding_acks = True
            log.info("mqtt parking past its limit, PUBACKs held back",
                     parked=len(self.parked), parked_bytes=self.parked_bytes)  # fmt: skip
        too_far = self.parked_bytes > PARKED_DISCONNECT_BYTES
        return too_far and self._owner._over_receive_maximum(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.closed.set()
        self._owner._on_lost(self, exc)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._owner._pump()

    def send_ack(self, packet_id: int) -> None:
        """Send the PUBACK of an incoming message, or hold it back while too much is parked."""
        puback = mqtt5.PubAckPacket(packet_id).write()
        if self.holding_acks:
            self.held_acks.append(puback)
        else:
            self.send(puback)

    def send(self, data: bytes) -> None:
        """Queue bytes; everything queued in one loop turn goes out in one write."""
        if self.transport is None:
            return
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(data)
        self.out_bytes += len(data)

    def send_many(self, packets: list[bytes], size: int) -> None:
        """Queue packets of ``size`` bytes in all, as :meth:`send` queues one."""
        if self.transport is None:
            return
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.extend(packets)
        self.out_bytes += size

    @property
    def writable(self) -> bool:
        """Room for more publishes: the transport is below its high-water mark, and so
        is what this loop turn has queued (one pump must not queue megabytes)."""
        return (
            self.transport is not None
            and not self.writing_paused
            and (self.out_bytes < WRITE_HIGH_WATER)
        )

    def _flush(self) -> None:
        if self.transport is not None and self._out:
            self.transport.write(b"".join(self._out))
        self._out.clear()
        refill = self.out_bytes >= WRITE_HIGH_WATER
        self.out_bytes = 0
        if refill and not self.writing_paused:
            self._owner._pump()

    def close_now(self, last: bytes) -> None:
        """Write what this loop turn queued, the held-back PUBACKs (their messages were
        handled: the next connection must not bring them again) and ``last``; close."""
        if self.transport is None:
            return
        self.transport.write(b"".join([*self._out, *self.held_acks, last]))
        self._out.clear()
        self.held_acks.clear()
        self.transport.close()

    def abort(self) -> None:
        """Drop the connection now."""
        if self.transport is not None:
            self.transport.abort()
