"""The chaos proxy relays MQTT to a real broker and really cuts connections."""

from __future__ import annotations

import asyncio

from fleet.proxy import TcpProxy
from fleet.servers import MosquittoProcess
from servicekit.mqtt import MqttClient
from servicekit.urls import MqttUrl


async def test_proxy_relays_drops_and_refuses(mosquitto: MosquittoProcess, device_id: str) -> None:
    """A client connects through the proxy, is cut by drop(), and is refused while refusing()."""
    async with TcpProxy("127.0.0.1", mosquitto.port) as proxy:
        url = MqttUrl.parse(f"mqtt://127.0.0.1:{proxy.port}")
        async with MqttClient(url, client_id=f"{device_id}-proxy", clean_start=True) as client:
            assert client.connected
            assert proxy.stats.open == 1
            assert proxy.drop(1.0) == 1
            for _ in range(250):
                if not client.connected:
                    break
                await asyncio.sleep(0.02)
            assert not client.connected
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
