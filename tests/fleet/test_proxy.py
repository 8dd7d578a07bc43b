"""The chaos proxy relays MQTT to a real broker and really cuts connections."""

from __future__ import annotations

import asyncio

from gmqtt import Client

from fleet.proxy import TcpProxy
from fleet.servers import MosquittoProcess


async def test_proxy_relays_drops_and_refuses(mosquitto: MosquittoProcess, device_id: str) -> None:
    """A client connects through the proxy, is cut by drop(), and is refused while refusing()."""
    async with TcpProxy("127.0.0.1", mosquitto.port) as proxy:
        disconnected = asyncio.Event()
        client = Client(f"{device_id}-proxy")
        client.on_disconnect = lambda *_args, **_kw: disconnected.set()
        client.set_config({"reconnect_retries": 0})
        await client.connect("127.0.0.1", proxy.port)
        assert client.is_connected
        assert proxy.stats.open == 1
        assert proxy.drop(1.0) == 1
        await asyncio.wait_for(disconnected.wait(), 5)
        assert not client.is_connected
        async with proxy.refusing():
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                # The proxy aborts at once: EOF or a reset, never a relayed CONNACK.
                assert await asyncio.wait_for(reader.read(), 5) == b""
            except ConnectionResetError:
                pass
            finally:
                writer.close()
        assert proxy.stats.refused >= 1
        assert proxy.stats.dropped == 1
