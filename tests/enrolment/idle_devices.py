"""Many idle MQTT 5 sessions in one process, watched for disconnects with one epoll.

paho's loop uses ``select()``, which fails past file descriptor 1024: a
thousand paho clients in one test process cannot work. An idle device needs
only CONNECT, CONNACK and a socket to watch: after CONNACK a client with no
subscription is sent nothing, so any byte (a DISCONNECT) or EOF means the
broker ended its session.
"""

from __future__ import annotations

import selectors
import socket
import time
from types import TracebackType
from typing import Self

from enrolment.control import connect_packet

KEEPALIVE_S = 600  # no PINGREQ is ever due during a test


class IdleDevices:
    """Open sessions, then report which ones the broker ended (a context manager)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sockets: dict[str, socket.socket] = {}
        self.ended: set[str] = set()
        self._selector = selectors.DefaultSelector()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._selector.close()
        for sock in self.sockets.values():
            sock.close()

    def connect(self, name: str, client_id: str, password: str) -> int:
        """Open ``name``'s session and return the CONNACK reason code (0: connected)."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.sendall(connect_packet(client_id, name, password, KEEPALIVE_S))
        header = sock.recv(2)
        rest = sock.recv(header[1]) if len(header) == 2 else b""
        if header[:1] != b"\x20" or len(rest) < 2:
            sock.close()
            raise ConnectionError(f"{name}: no CONNACK ({header + rest!r})")
        if rest[1] != 0:
            sock.close()
            return rest[1]
        sock.setblocking(False)
        self.sockets[name] = sock
        self._selector.register(sock, selectors.EVENT_READ, name)
        return 0

    def watch(self, seconds: float) -> set[str]:
        """Collect ended sessions for ``seconds``; return all ended so far."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            for key, _ in self._selector.select(left):
                name = str(key.data)
                self._selector.unregister(key.fileobj)
                self.ended.add(name)
        return set(self.ended)

    def wait_ended(self, names: set[str], limit_s: float) -> float:
        """Seconds until every one of ``names`` ended (``limit_s`` or more if some did not)."""
        start = time.monotonic()
        while not names <= self.ended and time.monotonic() - start < limit_s:
            self.watch(0.005)
        return time.monotonic() - start
