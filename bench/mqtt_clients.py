"""Receive + PUBACK throughput of the MQTT clients we could build the bridge on.

Not a test. Every client drains the same backlog that the broker queued for its
persistent session (so publishers cost nothing during the timed part), and
acks each message from the asyncio loop, the way the bridge does after its
Redis write:

- paho-mqtt 2.x: network loop in its own thread, manual_ack=True, each message
  handed to the loop with call_soon_threadsafe, client.ack(mid, 1) from there;
- gmqtt, PUBACK after an async on_message returns 0 (optimistic_acknowledgement=False);
- gmqtt acking on receipt (optimistic, the default: unsafe for us, shown as a ceiling);
- mqtt5 (Rust codec, sans-IO) under an asyncio Protocol: one write per read for the acks.

Run: .venv/bin/python -m bench.mqtt_clients [--messages 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from gmqtt import Client as GClient
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench._loadgen import create_session, publish_load
from fleet.servers import MosquittoProcess

HOST = "127.0.0.1"
Drain = Callable[[int, str, int], Awaitable[float]]


async def drain_paho(port: int, client_id: str, total: int) -> float:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    state = {"count": 0, "first": 0.0, "last": 0.0}
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5, manual_ack=True
    )

    def ack(mid: int) -> None:
        client.ack(mid, 1)
        state["count"] += 1
        if state["count"] == 1:
            state["first"] = time.perf_counter()
        if state["count"] == total:
            state["last"] = time.perf_counter()
            done.set()

    client.on_message = lambda c, u, msg: loop.call_soon_threadsafe(ack, msg.mid)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    props.ReceiveMaximum = 1000
    client.connect(HOST, port, clean_start=False, properties=props)
    client.loop_start()
    await done.wait()
    client.disconnect()
    client.loop_stop()
    return total / (state["last"] - state["first"])


async def _drain_gmqtt(port: int, client_id: str, total: int, optimistic: bool) -> float:
    done = asyncio.Event()
    state = {"count": 0, "first": 0.0, "last": 0.0}

    def count() -> None:
        state["count"] += 1
        if state["count"] == 1:
            state["first"] = time.perf_counter()
        if state["count"] == total:
            state["last"] = time.perf_counter()
            done.set()

    async def on_message(client: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:
        count()
        return 0

    client = GClient(
        client_id,
        clean_session=False,
        optimistic_acknowledgement=optimistic,
        session_expiry_interval=3600,
        receive_maximum=1000,
    )
    client.on_message = on_message
    await client.connect(HOST, port)
    await done.wait()
    await client.disconnect()
    return total / (state["last"] - state["first"])


async def drain_gmqtt_after(port: int, client_id: str, total: int) -> float:
    return await _drain_gmqtt(port, client_id, total, optimistic=False)


async def drain_gmqtt_optimistic(port: int, client_id: str, total: int) -> float:
    return await _drain_gmqtt(port, client_id, total, optimistic=True)


async def drain_mqtt5(port: int, client_id: str, total: int) -> float:
    import mqtt5  # noqa: PLC0415 - optional: only this bench uses it

    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    state = {"count": 0, "first": 0.0, "last": 0.0}

    class Receiver(asyncio.Protocol):
        def __init__(self) -> None:
            self.buffer = bytearray()
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport
            connect = mqtt5.ConnectPacket(
                client_id, clean_start=False, session_expiry_interval=3600, receive_max=1000
            )
            transport.write(connect.write())

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            acks = []
            offset = 0
            view = memoryview(self.buffer)
            while offset < len(self.buffer):
                try:
                    packet, size = mqtt5.read(view[offset:])
                except IndexError:  # an incomplete packet: wait for more bytes
                    break
                offset += size
                if isinstance(packet, mqtt5.PublishPacket):
                    acks.append(mqtt5.PubAckPacket(packet.packet_id).write())
                    state["count"] += 1
                    if state["count"] == 1:
                        state["first"] = time.perf_counter()
                    if state["count"] == total:
                        state["last"] = time.perf_counter()
                        done.set()
            view.release()
            del self.buffer[:offset]
            if acks and self.transport is not None:
                loop.call_soon(self.transport.write, b"".join(acks))

    transport, _ = await loop.create_connection(Receiver, HOST, port)
    await done.wait()
    transport.write(mqtt5.DisconnectPacket().write())
    transport.close()
    return total / (state["last"] - state["first"])


CLIENTS: dict[str, Drain] = {
    "paho (thread → loop, manual ack)": drain_paho,
    "gmqtt (ack after async handler)": drain_gmqtt_after,
    "gmqtt (ack on receipt, unsafe)": drain_gmqtt_optimistic,
    "mqtt5 codec + asyncio Protocol": drain_mqtt5,
}


def main() -> None:
    """Run every client on the same backlog, ``--rounds`` times, print medians."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--publishers", type=int, default=4)
    args = parser.parse_args()
    try:
        import mqtt5  # noqa: F401, PLC0415
    except ImportError:
        del CLIENTS["mqtt5 codec + asyncio Protocol"]
    rates: dict[str, list[float]] = {name: [] for name in CLIENTS}
    with tempfile.TemporaryDirectory() as tmp, MosquittoProcess(Path(tmp)) as broker:
        for round_no in range(args.rounds):
            ids = {name: f"mc-{round_no}-{i}" for i, name in enumerate(CLIENTS)}
            for i, name in enumerate(CLIENTS):
                create_session(
                    HOST, broker.port, ids[name], f"$share/mc{round_no}{i}/v1/devices/+/orders"
                )
            publish_load(HOST, broker.port, args.messages, args.publishers, devices=100)
            for name, drain in CLIENTS.items():
                rate = asyncio.run(drain(broker.port, ids[name], args.messages))
                rates[name].append(rate)
                print(f"round {round_no + 1}: {name:38s} {rate:10,.0f} msg/s", flush=True)
    base = statistics.median(rates["paho (thread → loop, manual ack)"])
    print(f"\nmedian of {args.rounds} rounds, {args.messages:,} queued QoS 1 messages each:")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"  {name:38s} {median:10,.0f} msg/s  {median / base:5.2f}× paho")


if __name__ == "__main__":
    main()
