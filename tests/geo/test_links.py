"""The partition links: relay bytes, blackhole without a reset, heal in order."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest

from fleet.geo.links import LinkHost
from testrig.servers import free_port


@pytest.fixture
def echo() -> Iterator[int]:
    """A one-connection-at-a-time echo server on a thread."""
    import threading  # noqa: PLC0415 - only this fixture needs it

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(4096):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port
    server.close()


def test_blackhole_holds_bytes_without_reset_and_heal_delivers_them(echo: int) -> None:
    """A blackholed link answers nothing and closes nothing; healed, the held bytes arrive."""
    with LinkHost() as host:
        port = free_port()
        host.add("a>b", ("127.0.0.1", echo), port)
        with socket.create_connection(("127.0.0.1", port), 2) as sock:
            sock.sendall(b"one")
            assert sock.recv(16) == b"one"
            host.blackhole("a>b")
            sock.sendall(b"two")
            sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                sock.recv(16)  # no answer, and no reset either
            host.heal("a>b")
            sock.settimeout(2)
            assert sock.recv(16) == b"two"


def test_reset_aborts_open_connections(echo: int) -> None:
    """reset() aborts what is open; the next connection works."""
    with LinkHost() as host:
        port = free_port()
        host.add("a>b", ("127.0.0.1", echo), port)
        with socket.create_connection(("127.0.0.1", port), 2) as sock:
            sock.sendall(b"x")
            assert sock.recv(4) == b"x"
            assert host.reset("a>b") == 1
            sock.settimeout(2)
            with contextlib.suppress(ConnectionResetError):  # an RST also shows a reset
                assert sock.recv(4) == b""
