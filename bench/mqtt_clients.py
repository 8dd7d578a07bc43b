"""Receive + PUBACK throughput of the MQTT clients we could build on, like with like.

Not a test. Every client drains the same backlog that the broker queued for its
persistent session (so publishers cost nothing during the timed part), with
Receive Maximum 1000, timed from its first to its last message, and acks each
message from the asyncio loop, the way the bridge does after its Redis write.
Two groups, compared only within themselves:

Full clients (reconnects, keep-alive, subscriptions, flow control):

- servicekit.mqtt.MqttClient: ours, asyncio protocol on the Rust mqtt5 codec;
- paho-mqtt 2.x on the event loop: socket callbacks drive loop_read/loop_write
  (as the edge agent runs it), manual_ack, client.ack(mid, 1) in on_message;
- paho-mqtt 2.x threaded: loop_start(), each message handed to the loop with
  call_soon_threadsafe, client.ack(mid, 1) from there;
- gmqtt (only if installed; no longer a dependency), PUBACK after an async
  on_message returns 0, and acking on receipt (unsafe for us).

Bare codec loop (no client features; the limit for a Python process):

- mqtt5 codec under an asyncio Protocol: parse, ack, one write per read.

Run: .venv/bin/python -m bench.mqtt_clients [--messages 100000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import mqtt5
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench._loadgen import create_session, publish_load
from servicekit.mqtt import Ack, MqttClient, Subscription
from servicekit.urls import MqttUrl
from testrig.servers import MosquittoProcess

HOST = "127.0.0.1"
Drain = Callable[[int, str, int], Awaitable[float]]


class Clock:
    """Counts messages; notes the first and the last."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.count = 0
        self.first = self.last = 0.0
        self.done = asyncio.Event()

    def tick(self) -> None:
        self.count += 1
        if self.count == 1:
            self.first = time.perf_counter()
        if self.count == self.total:
            self.last = time.perf_counter()
            self.done.set()

    @property
    def rate(self) -> float:
        return self.total / (self.last - self.first)


def _paho_client(client_id: str) -> paho.Client:
    return paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5, manual_ack=True
    )


def _connect_props() -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    props.ReceiveMaximum = 1000
    return props


async def drain_ours(port: int, client_id: str, total: int) -> float:
    """servicekit.mqtt.MqttClient: the handler acks at once."""
    clock = Clock(total)

    def handler(_topic: str, _payload: bytes, ack: Ack) -> None:
        ack()
        clock.tick()

    client = MqttClient(
        MqttUrl.parse(f"mqtt://{HOST}:{port}"),
        client_id=client_id,
        subscriptions=[Subscription("$share/unused/v1/devices/+/orders", handler)],
        receive_maximum=1000,
    )
    # The session already holds the subscription; the SUBSCRIBE the client sends
    # again matches a group that receives nothing new.
    async with client:
        await clock.done.wait()
    return clock.rate


async def drain_paho_on_loop(port: int, client_id: str, total: int) -> float:
    """paho driven by the event loop through its socket callbacks (as the edge agent runs it)."""
    loop = asyncio.get_running_loop()
    clock = Clock(total)
    client = _paho_client(client_id)

    def on_message(c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        c.ack(msg.mid, 1)
        clock.tick()

    client.on_message = on_message
    client.on_socket_open = lambda c, _u, sock: loop.add_reader(sock, c.loop_read)
    client.on_socket_close = lambda _c, _u, sock: loop.remove_reader(sock)
    client.on_socket_register_write = lambda c, _u, sock: loop.add_writer(sock, c.loop_write)
    client.on_socket_unregister_write = lambda _c, _u, sock: loop.remove_writer(sock)
    client.connect(HOST, port, clean_start=False, properties=_connect_props())

    async def misc() -> None:
        while True:
            client.loop_misc()
            await asyncio.sleep(1)

    ticker = asyncio.create_task(misc())
    await clock.done.wait()
    ticker.cancel()
    client.disconnect()
    return clock.rate


async def drain_paho_threaded(port: int, client_id: str, total: int) -> float:
    """paho's own network thread; each message handed to the loop, acked from there."""
    loop = asyncio.get_running_loop()
    clock = Clock(total)
    client = _paho_client(client_id)

    def ack(mid: int) -> None:
        client.ack(mid, 1)
        clock.tick()

    client.on_message = lambda c, u, msg: loop.call_soon_threadsafe(ack, msg.mid)
    client.connect(HOST, port, clean_start=False, properties=_connect_props())
    client.loop_start()
    await clock.done.wait()
    client.disconnect()
    client.loop_stop()
    return clock.rate


async def _drain_gmqtt(port: int, client_id: str, total: int, optimistic: bool) -> float:
    from gmqtt import Client  # noqa: PLC0415 - optional, not a dependency any more

    clock = Clock(total)

    async def on_message(client: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:
        clock.tick()
        return 0

    client = Client(
        client_id,
        clean_session=False,
        optimistic_acknowledgement=optimistic,
        session_expiry_interval=3600,
        receive_maximum=1000,
    )
    client.on_message = on_message
    await client.connect(HOST, port)
    await clock.done.wait()
    await client.disconnect()
    return clock.rate


async def drain_gmqtt_after(port: int, client_id: str, total: int) -> float:
    return await _drain_gmqtt(port, client_id, total, optimistic=False)


async def drain_gmqtt_optimistic(port: int, client_id: str, total: int) -> float:
    return await _drain_gmqtt(port, client_id, total, optimistic=True)


async def drain_codec_loop(port: int, client_id: str, total: int) -> float:
    """The bare loop: parse with the mqtt5 codec, ack every PUBLISH, one write per read."""
    loop = asyncio.get_running_loop()
    clock = Clock(total)

    class Receiver(asyncio.Protocol):
        def __init__(self) -> None:
            self.buffer = bytearray()
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # uvloop's transports implement the interface without subclassing it.
            self.transport = cast(asyncio.Transport, transport)
            connect = mqtt5.ConnectPacket(
                client_id, clean_start=False, session_expiry_interval=3600, receive_max=1000
            )
            self.transport.write(connect.write())

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            acks = []
            offset = 0
            with memoryview(self.buffer) as view:
                while offset < len(view):
                    try:
                        packet, size = mqtt5.read(view[offset:])
                    except IndexError:  # an incomplete packet: wait for more bytes
                        break
                    offset += size
                    if isinstance(packet, mqtt5.PublishPacket) and packet.packet_id is not None:
                        acks.append(mqtt5.PubAckPacket(packet.packet_id).write())
                        clock.tick()
            del self.buffer[:offset]
            if acks and self.transport is not None:
                self.transport.write(b"".join(acks))

    transport, _ = await loop.create_connection(Receiver, HOST, port)
    await clock.done.wait()
    transport.write(mqtt5.DisconnectPacket().write())
    transport.close()
    return clock.rate


FULL_CLIENTS: dict[str, Drain] = {
    "servicekit.mqtt (ours, mqtt5 codec)": drain_ours,
    "paho on the event loop": drain_paho_on_loop,
    "paho threaded (thread → loop)": drain_paho_threaded,
    "gmqtt, ack after async handler": drain_gmqtt_after,
    "gmqtt, ack on receipt (unsafe)": drain_gmqtt_optimistic,
}
BARE: dict[str, Drain] = {"bare mqtt5 codec loop (ceiling)": drain_codec_loop}
BASELINE = "paho on the event loop"


def main() -> None:
    """Run every client on the same backlog, ``--rounds`` times, print medians."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--publishers", type=int, default=4)
    args = parser.parse_args()
    try:
        import gmqtt  # noqa: F401, PLC0415
    except ImportError:
        FULL_CLIENTS.pop("gmqtt, ack after async handler")
        FULL_CLIENTS.pop("gmqtt, ack on receipt (unsafe)")
    clients = {**FULL_CLIENTS, **BARE}
    rates: dict[str, list[float]] = {name: [] for name in clients}
    with tempfile.TemporaryDirectory() as tmp, MosquittoProcess(Path(tmp)) as broker:
        for round_no in range(args.rounds):
            ids = {name: f"mc-{round_no}-{i}" for i, name in enumerate(clients)}
            for i, name in enumerate(clients):
                create_session(
                    HOST, broker.port, ids[name], f"$share/mc{round_no}{i}/v1/devices/+/orders"
                )
            publish_load(HOST, broker.port, args.messages, args.publishers, devices=100)
            for name, drain in clients.items():
                rate = asyncio.run(drain(broker.port, ids[name], args.messages))
                rates[name].append(rate)
                print(f"round {round_no + 1}: {name:38s} {rate:10,.0f} msg/s", flush=True)
    med = {name: statistics.median(values) for name, values in rates.items()}
    ceiling = med["bare mqtt5 codec loop (ceiling)"]
    print(f"\nmedian of {args.rounds} rounds, {args.messages:,} queued QoS 1 messages each:")
    print("full clients:")
    for name in FULL_CLIENTS:
        print(f"  {name:38s} {med[name]:10,.0f} msg/s  {med[name] / med[BASELINE]:5.2f}× "
              f"paho on the loop   {med[name] / ceiling:4.0%} of the bare loop")  # fmt: skip
    print("bare codec loop (no client features):")
    print(f"  {'bare mqtt5 codec loop (ceiling)':38s} {ceiling:10,.0f} msg/s")


if __name__ == "__main__":
    main()
