"""The chaos proxy relays MQTT to a real broker and really cuts connections."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from servicekit.mqtt import MqttClient, MqttMetrics
from servicekit.urls import MqttUrl
from testrig.proxy import TcpProxy
from testrig.servers import MosquittoProcess


async def test_proxy_relays_drops_and_refuses(mosquitto: MosquittoProcess, device_id: str) -> None:
    """A client connects through the proxy, is cut by drop(), and is refused while refusing()."""
    async with TcpProxy("127.0.0.1", mosquitto.port) as proxy:
        url = MqttUrl.parse(f"mqtt://127.0.0.1:{proxy.port}")
        metrics = MqttMetrics("proxytest", CollectorRegistry())
        client = MqttClient(url, client_id=f"{device_id}-proxy", clean_start=True, metrics=metrics)
        async with client:
            assert client.connected
            assert proxy.stats.open == 1
            assert proxy.drop(1.0) == 1
            for _ in range(250):  # the client may reconnect at once: count the loss
                if metrics.connections_lost._value.get() == 1:
                    break
                await asyncio.sleep(0.02)
            assert metrics.connections_lost._value.get() == 1
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
