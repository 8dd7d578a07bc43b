"""The cloud's MQTT client (servicekit.mqtt), tested directly.

Against a real Mosquitto for the ordinary flow and session resumption, and
against a scripted socket server for what a broker won't do on demand.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import mqtt5
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from servicekit.backoff import Backoff
from servicekit.errors import LoopFailed
from servicekit.mqtt import (
    PARKED_DISCONNECT_BYTES,
    PARKED_MAX_BYTES,
    WRITE_HIGH_WATER,
    Ack,
    MqttClient,
    MqttError,
    MqttMetrics,
    QueueFull,
    Subscription,
)
from servicekit.urls import MqttUrl
from testrig.servers import MosquittoProcess, free_port
from tests.helpers import wait_until

from .scripted_broker import ScriptedBroker, ScriptedSession

Message = tuple[str, bytes, Ack]


def qos1_id(packet: mqtt5.PublishPacket) -> int:
    """The packet id of a QoS 1 PUBLISH (always set at QoS 1)."""
    assert packet.packet_id is not None
    return packet.packet_id


class Inbox:
    """A handler that keeps every message and its ack."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.changed = asyncio.Event()

    def __call__(self, topic: str, payload: bytes, ack: Ack) -> None:
        self.messages.append((topic, payload, ack))
        self.changed.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self.messages) < count:
                self.changed.clear()
                await self.changed.wait()

    @property
    def payloads(self) -> list[bytes]:
        return [payload for _topic, payload, _ack in self.messages]


def make_client(url: str, inbox: Inbox | None = None, **kwargs: Any) -> MqttClient:
    subs = [Subscription("v1/devices/+/orders", inbox)] if inbox is not None else []
    kwargs.setdefault("backoff", Backoff(0.01, 0.05))
    kwargs.setdefault("client_id", "test-client")
    return MqttClient(MqttUrl.parse(url), subscriptions=subs, **kwargs)


@asynccontextmanager
async def connected(
    broker: ScriptedBroker, client: MqttClient, **accept: Any
) -> AsyncIterator[ScriptedSession]:
    """Enter ``client`` while the scripted broker accepts it; yield its session."""
    entering = asyncio.ensure_future(client.__aenter__())
    session = await broker.session()
    await session.accept(**accept)
    await entering
    try:
        yield session
    finally:
        await client.__aexit__(None, None, None)


def publish_packet(packet_id: int, payload: bytes) -> mqtt5.PublishPacket:
    return mqtt5.PublishPacket(
        "v1/devices/d1/orders", payload, qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=packet_id
    )


# -- against Mosquitto ----------------------------------------------------------------------


async def test_receives_acks_and_publishes_through_mosquitto(
    mosquitto: MosquittoProcess, device_id: str
) -> None:
    """A message published by one client reaches the other's handler; its publish future ends
    with a PUBACK reason code of success (0x10: nobody else subscribed to that topic)."""
    inbox = Inbox()
    receiver = MqttClient(
        MqttUrl.parse(mosquitto.url),
        client_id=f"{device_id}-rx",
        subscriptions=[Subscription(f"v1/devices/{device_id}/orders", inbox)],
        clean_start=True,
    )
    sender = MqttClient(MqttUrl.parse(mosquitto.url), client_id=f"{device_id}-tx", clean_start=True)
    async with receiver, sender:
        assert receiver.connected
        assert sender.connected
        code = await sender.publish_acked(f"v1/devices/{device_id}/orders", b"hello")
        assert code == 0
        await inbox.wait_for(1)
        topic, payload, ack = inbox.messages[0]
        assert (topic, payload) == (f"v1/devices/{device_id}/orders", b"hello")
        ack()
        assert await sender.publish_acked(f"v1/devices/{device_id}/nobody", b"x") == 0x10


async def test_an_unacked_message_comes_back_after_a_reconnect(
    mosquitto: MosquittoProcess, device_id: str
) -> None:
    """Not acked before the connection dropped: Mosquitto resends it on the resumed session,
    and the old ack is a no-op on the new connection."""
    inbox = Inbox()
    client = MqttClient(
        MqttUrl.parse(mosquitto.url),
        client_id=f"{device_id}-rx",
        subscriptions=[Subscription(f"v1/devices/{device_id}/orders", inbox)],
        clean_start=True,
        backoff=Backoff(0.01, 0.05),
    )
    async with client, make_client(mosquitto.url, client_id=f"{device_id}-tx") as sender:
        await sender.publish_acked(f"v1/devices/{device_id}/orders", b"once")
        await inbox.wait_for(1)
        stale_ack = inbox.messages[0][2]
        assert client._wire is not None
        client._wire.abort()  # the connection dies with the message unacked
        await inbox.wait_for(2)
        assert inbox.payloads == [b"once", b"once"]
        assert client.connects == 2
        stale_ack()  # belongs to the dead connection: nothing sent
        inbox.messages[1][2]()


async def test_a_responder_flood_keeps_hearing_its_pubacks_past_the_parking_limit(
    mosquitto: MosquittoProcess, device_id: str
) -> None:
    """The status-query deadlock: a handler that acks each message only once its reply is
    PUBACKed (the pipeline's responder) takes a flood on a shared subscription. Mosquitto
    answers each PUBACK with more than it freed, so the parking passes PARKED_MAX_BYTES; the
    replies' PUBACKs are still heard, every message is answered, and our own PUBACKs are held
    back while the parking is past the limit (so Mosquitto stops adding to it)."""
    window, size, count = 20, 16 * 1024, 400  # the broker's max_packet_size is 20 KiB
    topic = f"v1/devices/{device_id}/orders"
    queue: asyncio.Queue[Message] = asyncio.Queue()
    url = MqttUrl.parse(mosquitto.url)
    subs = [Subscription(f"$share/g/{topic}", lambda t, p, a: queue.put_nowait((t, p, a)))]
    responder = MqttClient(url, client_id=f"{device_id}-rx", clean_start=True,
                           session_expiry_s=0, receive_maximum=window,
                           subscriptions=subs)  # fmt: skip
    answered: list[bytes] = []
    most_parked = most_held = 0

    async def respond() -> None:
        nonlocal most_parked, most_held
        while len(answered) < count:
            _topic, payload, ack = await queue.get()
            wire = responder._wire
            assert wire is not None
            async with asyncio.timeout(5):
                assert await responder.publish_acked(f"{topic}/answers", payload[:8]) == 0x10
            ack()
            most_parked = max(most_parked, wire.parked_bytes)
            most_held = max(most_held, len(wire.held_acks))
            answered.append(payload[:8])

    async with responder, MqttClient(url, client_id=f"{device_id}-tx", clean_start=True) as flood:
        sent = [flood.publish_acked(topic, b"%08d" % i + b"x" * size) for i in range(count)]
        await respond()
        assert await asyncio.gather(*sent) == [0] * count
    assert sorted(answered) == [b"%08d" % i for i in range(count)]
    assert most_parked >= PARKED_MAX_BYTES  # the fault: the old client stopped reading here
    assert most_held > 0


async def test_closing_waits_for_every_queued_publish_to_be_acked(
    mosquitto: MosquittoProcess, device_id: str
) -> None:
    """3,000 publishes (three times the broker's Receive Maximum) and an immediate exit: the
    exit waits until the broker acked all of them, and a subscriber gets every one."""
    count = 3000
    inbox = Inbox()
    topic = f"v1/devices/{device_id}/orders"
    url = MqttUrl.parse(mosquitto.url)

    def take(topic: str, payload: bytes, ack: Ack) -> None:
        ack()
        inbox(topic, payload, ack)

    subs = [Subscription(topic, take)]
    async with MqttClient(url, client_id=f"{device_id}-rx", clean_start=True, subscriptions=subs):
        sender = MqttClient(url, client_id=f"{device_id}-tx", clean_start=True)
        async with sender:
            futures = [sender.publish_acked(topic, b"%d" % i) for i in range(count)]
            assert sender.in_flight > 1000  # the fault: most are not even written yet
        assert all(f.done() for f in futures)
        assert {f.result() for f in futures} == {0}
        assert sender.in_flight == 0
        await inbox.wait_for(count)
        assert sorted(int(p) for p in inbox.payloads) == list(range(count))


# -- against a scripted broker --------------------------------------------------------------


async def test_connect_carries_receive_maximum_and_maximum_packet_size() -> None:
    """CONNECT announces our Receive Maximum, Maximum Packet Size and session expiry."""
    async with ScriptedBroker() as broker:
        client = make_client(
            broker.url, Inbox(), receive_maximum=7, max_packet_size=20480, session_expiry_s=99
        )
        entering = asyncio.ensure_future(client.__aenter__())
        session = await broker.session()
        connect = await session.accept()
        await entering
        await client.__aexit__(None, None, None)
    assert connect.receive_max == 7
    assert connect.max_packet_size == 20480
    assert connect.session_expiry_interval == 99
    assert connect.clean_start is False


async def test_partial_and_coalesced_frames_are_reassembled() -> None:
    """A PUBLISH that arrives a byte at a time, and two packets in one segment, are parsed."""
    inbox = Inbox()
    async with ScriptedBroker() as broker, connected(broker, make_client(broker.url, inbox)) as s:
        first = publish_packet(2, b"A" * 300).write()
        for index in range(len(first)):
            s.send_raw(first[index : index + 1])
            await asyncio.sleep(0)
        s.send_raw(publish_packet(3, b"B").write() + publish_packet(4, b"C").write()[:3])
        await inbox.wait_for(2)
        s.send_raw(publish_packet(4, b"C").write()[3:])
        await inbox.wait_for(3)
        assert inbox.payloads == [b"A" * 300, b"B", b"C"]
        for _topic, _payload, ack in inbox.messages:
            ack()
        acks = [await s.expect(mqtt5.PubAckPacket) for _ in range(3)]
        assert [a.packet_id for a in acks] == [2, 3, 4]


async def test_pings_and_drops_a_silent_broker() -> None:
    """The client sends PINGREQ every half keep-alive; a broker that answers nothing for 1.5
    keep-alives is dropped, and the supervisor connects again."""
    async with ScriptedBroker() as broker:
        client = make_client(broker.url, Inbox(), keepalive_s=1)
        async with connected(broker, client) as session:
            await session.expect(mqtt5.PingReqPacket)  # no PINGRESP: silence
            async with asyncio.timeout(5):
                await session.closed.wait()
            again = await broker.session()
            await again.accept()
            await wait_until(lambda: client.connected, what="reconnected")
            assert client.connects == 2


async def test_a_broker_answering_pings_keeps_the_connection() -> None:
    """PINGRESPs count as life: after three keep-alive periods the first connection stands."""
    async with ScriptedBroker() as broker:
        client = make_client(broker.url, Inbox(), keepalive_s=1)
        async with connected(broker, client) as session:
            for _ in range(6):
                await session.expect(mqtt5.PingReqPacket)
                session.send(mqtt5.PingRespPacket())
            assert not session.closed.is_set()
            assert broker.connections == 1


async def test_outgoing_packet_ids_are_reused_only_after_their_puback() -> None:
    """With the broker's Receive Maximum at 2, never more than 2 publishes are unacked, no id
    is used twice while in flight, ids come back into use after PUBACK, and every future ends."""
    async with ScriptedBroker() as broker:
        client = make_client(broker.url, None)
        async with connected(broker, client, receive_max=2, suback=False) as session:
            client._sender.ids = itertools.cycle([2, 3, 4])  # a tiny id space forces reuse
            futures = [client.publish_acked("v1/devices/d1/receipts", bytes([i])) for i in range(6)]
            in_flight: dict[int, bytes] = {}
            seen_ids: list[int] = []
            while len(seen_ids) < 6:
                while len(in_flight) < 2 and len(seen_ids) + len(in_flight) < 6:
                    packet = await session.expect(mqtt5.PublishPacket)
                    assert packet.packet_id not in in_flight
                    in_flight[qos1_id(packet)] = packet.payload
                assert session.packets.empty() or len(in_flight) < 2
                packet_id = max(in_flight)  # ack out of order
                del in_flight[packet_id]
                seen_ids.append(packet_id)
                session.send(mqtt5.PubAckPacket(packet_id))
                await asyncio.sleep(0.01)
            assert set(seen_ids) <= {2, 3, 4}
            assert len(seen_ids) == 6  # so at least three ids served twice
            results = await asyncio.gather(*futures)
            assert results == [0] * 6


async def test_an_incoming_packet_id_reused_after_its_ack_is_a_new_message() -> None:
    """The broker may reuse packet id 7 once we acked it: both messages reach the handler."""
    inbox = Inbox()
    async with ScriptedBroker() as broker, connected(broker, make_client(broker.url, inbox)) as s:
        s.send(publish_packet(7, b"first"))
        await inbox.wait_for(1)
        inbox.messages[0][2]()
        assert (await s.expect(mqtt5.PubAckPacket)).packet_id == 7
        s.send(publish_packet(7, b"second"))
        await inbox.wait_for(2)
        inbox.messages[1][2]()
        assert (await s.expect(mqtt5.PubAckPacket)).packet_id == 7
        assert inbox.payloads == [b"first", b"second"]


async def test_puback_reason_codes_reach_the_future_and_the_metrics() -> None:
    """A refused publish (0x87 not authorized) ends its future with the code, is counted by
    reason, and is not resent; 0x10 (no subscribers) is a success."""
    metrics = MqttMetrics("t", CollectorRegistry())
    async with ScriptedBroker() as broker:
        client = make_client(broker.url, None, metrics=metrics)
        async with connected(broker, client, suback=False) as session:
            refused = client.publish_acked("v1/devices/d1/receipts", b"r")
            nobody = client.publish_acked("v1/devices/d2/receipts", b"n")
            first = await session.expect(mqtt5.PublishPacket)
            second = await session.expect(mqtt5.PublishPacket)
            session.send(
                mqtt5.PubAckPacket(
                    qos1_id(first), reason_code=mqtt5.PubAckReasonCode.NOT_AUTHORIZED
                ),
                mqtt5.PubAckPacket(
                    qos1_id(second), reason_code=mqtt5.PubAckReasonCode.NO_MATCHING_SUBSCRIBERS
                ),
            )
            assert await refused == 0x87
            assert await nobody == 0x10
            assert client.in_flight == 0
    assert metrics.publish_refused.labels("not_authorized")._value.get() == 1


async def test_session_taken_over_is_loud_in_logs_and_metrics() -> None:
    """DISCONNECT 0x8E (another client took our id) logs an error naming the client id, counts
    the reason, and the supervisor connects again."""
    metrics = MqttMetrics("t", CollectorRegistry())
    async with ScriptedBroker() as broker:
        client = make_client(broker.url, Inbox(), metrics=metrics, client_id="bridge-a")
        async with connected(broker, client) as session:
            with capture_logs() as logs:
                session.send(
                    mqtt5.DisconnectPacket(
                        reason_code=mqtt5.DisconnectReasonCode.SESSION_TAKEN_OVER
                    )
                )
                session.close()
                again = await broker.session()
                await again.accept()
                await wait_until(lambda: client.connected, what="reconnected")
    taken = [e for e in logs if "session taken over" in e["event"]]
    assert taken
    assert taken[0]["log_level"] == "error"
    assert taken[0]["client_id"] == "bridge-a"
    assert metrics.disconnects.labels("session_taken_over")._value.get() == 1


async def test_receive_maximum_holds_from_connect_on() -> None:
    """A session backlog of 20 that the broker sends right after CONNACK, before the SUBACK,
    reaches the handler 5 at a time (our Receive Maximum): the rest is parked until acks."""
    inbox = Inbox()
    async with ScriptedBroker() as broker:
        client = make_client(broker.url, inbox, receive_maximum=5)
        entering = asyncio.ensure_future(client.__aenter__())
        session = await broker.session()
        await session.accept(session_present=True, suback=False)
        session.send(*[publish_packet(10 + i, bytes([i])) for i in range(20)])
        subscribe = await session.expect(mqtt5.SubscribePacket)
        session.send(
            mqtt5.SubAckPacket(
                subscribe.packet_id, [mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE]
            )
        )
        await inbox.wait_for(5)
        await entering  # the SUBACK behind the backlog is handled; the messages wait
        await asyncio.sleep(0.2)
        assert len(inbox.messages) == 5
        acked = 0
        while acked < 20:
            await inbox.wait_for(acked + 1)
            assert len(inbox.messages) - acked <= 5
            inbox.messages[acked][2]()
            acked += 1
        await entering
        assert inbox.payloads == [bytes([i]) for i in range(20)]
        await client.__aexit__(None, None, None)


async def test_a_full_receive_window_still_hears_the_pubacks_of_our_publishes() -> None:
    """A handler that acks a message only once its own reply is PUBACKed (the pipeline's
    status-query responder) must not deadlock: with the window full and a message parked,
    the broker's PUBACK behind it still reaches our publish, and the window still holds."""
    inbox = Inbox()
    async with ScriptedBroker() as broker:
        client = make_client(broker.url, inbox, receive_maximum=2)
        async with connected(broker, client) as session:
            session.send(*[publish_packet(10 + i, bytes([i])) for i in range(3)])
            await inbox.wait_for(2)
            reply = client.publish_acked("v1/devices/d1/status", b"answer")
            published = await session.expect(mqtt5.PublishPacket)
            session.send(mqtt5.PubAckPacket(qos1_id(published)))  # behind the parked third
            async with asyncio.timeout(5):
                assert await reply == 0
            assert len(inbox.messages) == 2  # the third is still parked
            inbox.messages[0][2]()
            await inbox.wait_for(3)
            assert inbox.payloads == [bytes([i]) for i in range(3)]


async def test_publishes_wait_while_the_socket_cannot_take_more() -> None:
    """A broker that stops reading: the client stops writing near its high-water mark and
    keeps the rest queued; once the broker reads again, every message arrives."""
    count, size = 3000, 8192  # 24 MB: more than loopback socket buffers hold
    async with ScriptedBroker() as broker:
        client = make_client(broker.url, None)
        async with connected(broker, client, suback=False) as session:
            assert session.transport is not None
            session.transport.pause_reading()
            futures = [
                client.publish_acked("v1/devices/d1/receipts", b"x" * size) for _ in range(count)
            ]
            await asyncio.sleep(0.5)
            assert client._wire is not None
            assert client._wire.transport is not None
            buffered = client._wire.transport.get_write_buffer_size()
            assert client._wire.writing_paused
            assert buffered <= 2 * WRITE_HIGH_WATER + size
            assert len(client._sender.queue) > count // 2  # most are still ours, not the socket's
            session.transport.resume_reading()
            for _ in range(count):
                packet = await session.expect(mqtt5.PublishPacket)
                session.send(mqtt5.PubAckPacket(qos1_id(packet)))
            assert await asyncio.gather(*futures) == [0] * count


@pytest.mark.parametrize("session_present", [True, False])
async def test_unacked_publishes_are_resent_after_a_reconnect(session_present: bool) -> None:
    """Unacked when the connection died: with the session present they are resent first with
    the same packet ids and DUP set (MQTT 5 §4.4); without it, as new messages."""
    async with ScriptedBroker() as broker:
        client = make_client(broker.url, None)
        async with connected(broker, client, suback=False) as session:
            futures = [client.publish_acked("v1/devices/d1/receipts", bytes([i])) for i in range(3)]
            first = [await session.expect(mqtt5.PublishPacket) for _ in range(3)]
            session.close()
            again = await broker.session()
            await again.accept(session_present=session_present, suback=False)
            resent = [await again.expect(mqtt5.PublishPacket) for _ in range(3)]
            assert [p.payload for p in resent] == [bytes([i]) for i in range(3)]
            assert all(p.duplicate is session_present for p in resent)
            if session_present:
                assert [p.packet_id for p in resent] == [p.packet_id for p in first]
            again.send(*[mqtt5.PubAckPacket(qos1_id(p)) for p in resent])
            assert await asyncio.gather(*futures) == [0, 0, 0]


async def test_keepalive_drops_a_silent_broker_while_reading_is_paused() -> None:
    """A half-open socket while the owner paused reading (the bridge during a Redis outage):
    PINGREQs still go out, the missing PINGRESP is noticed, the connection is dropped and the
    supervisor connects again; messages held by the pause reach the handler after resuming."""
    inbox = Inbox()
    async with ScriptedBroker() as broker:
        client = make_client(broker.url, inbox, keepalive_s=1)
        async with connected(broker, client) as session:
            client.pause_reading()
            session.send(publish_packet(5, b"held"))
            await session.expect(mqtt5.PingReqPacket)  # no PINGRESP: the peer is gone
            async with asyncio.timeout(5):
                await session.closed.wait()
            again = await broker.session()
            await again.accept()
            await wait_until(lambda: client.connected, what="reconnected")
            assert client.connects == 2
            assert inbox.messages == []  # held by the pause, never handed out
            again.send(publish_packet(6, b"resent"))
            await asyncio.sleep(0.05)
            assert inbox.messages == []
            client.resume_reading()
            await inbox.wait_for(1)
            assert inbox.payloads == [b"resent"]


async def test_a_broker_past_our_receive_maximum_is_disconnected_loudly() -> None:
    """Past PARKED_MAX_BYTES parked our PUBACKs are held back; a broker that ignores our Receive
    Maximum and sends more than PARKED_DISCONNECT_BYTES past it gets the held PUBACKs and then
    DISCONNECT 0x93 (MQTT 5 §3.3.4), an error log and a count: memory stays bounded."""
    metrics = MqttMetrics("t", CollectorRegistry())
    inbox = Inbox()
    size = 256 * 1024
    async with ScriptedBroker() as broker:
        client = make_client(broker.url, inbox, receive_maximum=2, metrics=metrics)
        with capture_logs() as logs:
            async with connected(broker, client) as session:
                count = PARKED_DISCONNECT_BYTES // size + 4
                flood = [publish_packet(10 + i, b"x" * size) for i in range(count)]
                session.send(*flood[:8])  # 2 MiB, 6 of them parked: past PARKED_MAX_BYTES
                wire = client._wire
                assert wire is not None
                await wait_until(lambda: len(wire.parked) == 6, what="six parked")
                inbox.messages[0][2]()  # handled; too much parked, so its PUBACK waits
                await inbox.wait_for(3)
                await asyncio.sleep(0.05)
                assert session.packets.empty()
                session.send(*flood[8:])
                assert (await session.expect(mqtt5.PubAckPacket)).packet_id == 10
                disconnect = await session.expect(mqtt5.DisconnectPacket)
                assert disconnect.reason_code == mqtt5.DisconnectReasonCode.RECEIVE_MAX_EXCEEDED
                async with asyncio.timeout(5):
                    await session.closed.wait()
                assert len(inbox.messages) == 3
    assert metrics.receive_maximum_exceeded._value.get() == 1
    errors = [e for e in logs if e["log_level"] == "error" and "receive maximum" in e["event"]]
    assert errors


async def test_held_back_pubacks_leave_before_the_disconnect_at_exit() -> None:
    """Acks given while too much is parked are held back; leaving ``async with`` sends them
    before DISCONNECT, so the broker does not bring those messages again."""
    inbox = Inbox()
    size = 256 * 1024
    async with ScriptedBroker() as broker:
        client = make_client(broker.url, inbox, receive_maximum=2)
        async with connected(broker, client) as session:
            client.pause_reading()
            session.send(*[publish_packet(10 + i, b"x" * size) for i in range(8)])
            wire = client._wire
            assert wire is not None
            await wait_until(lambda: len(wire.parked) == 8, what="eight parked: 2 MiB")
            client.resume_reading()
            await inbox.wait_for(2)
            inbox.messages[0][2]()
            await asyncio.sleep(0.05)
            assert wire.held_acks
            assert session.packets.empty()
        assert (await session.expect(mqtt5.PubAckPacket)).packet_id == 10
        await session.expect(mqtt5.DisconnectPacket)


async def test_a_full_queue_refuses_the_new_message_and_keeps_the_old() -> None:
    """With one publish in flight and the queue at max_queued, the next publish raises
    QueueFull (an MqttError), logs and counts it; every queued message still goes out."""
    metrics = MqttMetrics("t", CollectorRegistry())
    async with ScriptedBroker() as broker:
        client = make_client(broker.url, None, max_queued=3, metrics=metrics)
        async with connected(broker, client, receive_max=1, suback=False) as session:
            futures = [client.publish_acked("v1/devices/d1/receipts", bytes([i])) for i in range(4)]
            with capture_logs() as logs, pytest.raises(QueueFull) as refused:
                client.publish_acked("v1/devices/d1/receipts", b"new")
            assert isinstance(refused.value, MqttError)
            assert refused.value.reason == "queue_full"
            with pytest.raises(QueueFull):
                client.publish("v1/devices/d1/receipts", b"newer")
            assert metrics.publish_queue_full._value.get() == 2
            assert [e["log_level"] for e in logs if "queue full" in e["event"]] == ["warning"]
            payloads = []
            for _ in range(4):
                packet = await session.expect(mqtt5.PublishPacket)
                payloads.append(packet.payload)
                session.send(mqtt5.PubAckPacket(qos1_id(packet)))
            assert payloads == [bytes([i]) for i in range(4)]
            assert await asyncio.gather(*futures) == [0] * 4


async def test_publish_many_queues_a_leading_run_and_refuses_the_first_left_out() -> None:
    """publish_many queues what fits in max_queued, counts one refusal for the rest (they are
    not tried), and the queued ones go out in order through the window."""
    metrics = MqttMetrics("t", CollectorRegistry())
    async with ScriptedBroker() as broker:
        client = make_client(broker.url, None, max_queued=3, metrics=metrics)
        async with connected(broker, client, receive_max=2, suback=False) as session:
            batch = [(f"v1/devices/d{i}/status", bytes([i])) for i in range(6)]
            assert client.publish_many(batch) == 3
            assert metrics.publish_queue_full._value.get() == 1
            assert client.in_flight == 3
            received = []
            for _ in range(3):
                packet = await session.expect(mqtt5.PublishPacket)
                received.append((packet.topic, packet.payload))
                session.send(mqtt5.PubAckPacket(qos1_id(packet)))
            assert received == batch[:3]
            async with asyncio.timeout(5):
                await client._sender.idle.wait()


async def test_pubacks_of_every_form_end_their_futures_even_split_across_reads() -> None:
    """PUBACKs with code 0x00 (short and long form) and 0x10 end their futures with their
    codes, one with a property too, and so does one whose bytes come in two reads."""
    async with ScriptedBroker() as broker:
        client = make_client(broker.url, None)
        async with connected(broker, client, suback=False) as session:
            futures = [client.publish_acked("v1/devices/d1/status", bytes([i])) for i in range(4)]
            ids = [qos1_id(await session.expect(mqtt5.PublishPacket)) for _ in range(4)]
            no_subscribers = mqtt5.PubAckReasonCode(0x10)
            session.send_raw(
                mqtt5.PubAckPacket(ids[0]).write()
                + bytes([0x40, 3, ids[1] >> 8, ids[1] & 0xFF, 0x00])
                + mqtt5.PubAckPacket(ids[2], reason_code=no_subscribers, reason_str="none").write()
            )
            split = mqtt5.PubAckPacket(ids[3], reason_code=no_subscribers).write()
            session.send_raw(split[:3])
            await asyncio.sleep(0.05)
            assert not futures[3].done()
            session.send_raw(split[3:])
            async with asyncio.timeout(5):
                assert await asyncio.gather(*futures) == [0, 0, 0x10, 0x10]
            assert client.in_flight == 0


async def test_closing_gives_up_on_unacked_publishes_after_the_grace_period() -> None:
    """A broker that never acks: the exit waits out close_grace_s, not for ever, and warns
    how many publishes were left unacked."""
    async with ScriptedBroker() as broker:
        client = make_client(broker.url, None, close_grace_s=0.2)
        entering = asyncio.ensure_future(client.__aenter__())
        session = await broker.session()
        await session.accept(suback=False)
        await entering
        unacked = client.publish_acked("v1/devices/d1/receipts", b"x")
        await session.expect(mqtt5.PublishPacket)
        with capture_logs() as logs:
            async with asyncio.timeout(5):
                await client.__aexit__(None, None, None)
        await session.expect(mqtt5.DisconnectPacket)
        assert not unacked.done()
    gave_up = [e for e in logs if "unacked" in e["event"]]
    assert gave_up
    assert gave_up[0]["unacked"] == 1


async def test_the_supervisor_retries_for_as_long_as_the_broker_is_down() -> None:
    """No broker: ``async with`` carries on after its wait, the supervisor keeps trying with
    backoff; when a broker appears it connects, and CONNACK+SUBACK reset the backoff."""
    port = free_port()
    client = make_client(f"mqtt://127.0.0.1:{port}", Inbox(), connect_wait_s=0.2)
    async with client:
        await wait_until(lambda: client.backoff.failures >= 5, what="five failed attempts")
        assert not client.connected
        async with ScriptedBroker(port) as broker:
            session = await broker.session()
            await session.accept()
            await wait_until(lambda: client.connected, what="connected")
            assert client.backoff.failures == 0


async def test_an_unexpected_error_in_the_supervisor_ends_the_block_loudly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug in the supervisor is not swallowed: CRITICAL log naming the loop, and LoopFailed
    out of ``async with`` (the service then exits non-zero)."""
    client = make_client("mqtt://127.0.0.1:9", Inbox())

    async def broken() -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(client, "_connect_once", broken)
    with capture_logs() as logs, pytest.raises(LoopFailed) as raised:
        async with client:
            await asyncio.sleep(10)
    assert raised.value.loop == "mqtt-supervisor"
    assert isinstance(raised.value.__cause__, RuntimeError)
    died = [e for e in logs if e["event"] == "background_loop_failed"]
    assert died
    assert died[0]["log_level"] == "critical"
    assert died[0]["loop"] == "mqtt-supervisor"


def test_the_edge_never_imports_the_cloud_client() -> None:
    """A device installs only ``.[edge]``: importing the agent must not pull in mqtt5."""
    code = (
        "import sys, edge_agent, edge_agent.cli, edge_agent.transport, edge_agent.agent;"
        "bad = {'mqtt5', 'servicekit.mqtt'} & set(sys.modules); assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
