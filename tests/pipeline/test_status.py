"""The gmqtt status publisher against a real broker: windowed in-flight, every PUBACK awaited."""

from __future__ import annotations

from collections.abc import Callable

from fleet.servers import MosquittoProcess, port_is_open
from pipeline.status_gmqtt import GmqttStatusPublisher
from schemas import Status

from .conftest import StatusListener, eventually


async def test_publishes_past_its_window_and_the_brokers_limit(
    mosquitto: MosquittoProcess, status_listener: StatusListener, device_id: str
) -> None:
    """2,500 statuses (over the broker's Receive Maximum of 1,000) go out 100 in flight at a
    time; publish returns once the broker acked all, and a subscriber gets every one."""
    status_listener.subscribe(device_id)
    messages = [
        (device_id, Status(v=1, order_id=f"order-{i:08d}", status="confirmed", reason=None, at=1))
        for i in range(2500)
    ]
    async with GmqttStatusPublisher(mosquitto.url, f"{device_id}-pub", window=100) as publisher:
        assert await publisher.publish(messages) == 2500
        assert await publisher.publish(messages[:10]) == 10

    async def all_heard() -> bool:
        return len({s.order_id for _t, s in status_listener.received}) == 2500

    await eventually(all_heard, what="every status at the subscriber")


async def test_a_broker_outage_times_out_then_the_queued_statuses_go_out(
    mosquitto_factory: Callable[..., MosquittoProcess], device_id: str
) -> None:
    """With the broker killed, publish gives up after its timeout and keeps the messages; after
    a restart they are resent, and the next publish returns once those are acked too."""
    broker = mosquitto_factory()
    messages = [
        (device_id, Status(v=1, order_id=f"order-{i:08d}", status="fulfilled", reason=None, at=1))
        for i in range(50)
    ]
    async with GmqttStatusPublisher(broker.url, f"{device_id}-pub", ack_timeout_s=0.5) as publisher:
        assert await publisher.publish(messages[:10]) == 10
        broker.kill()
        assert not port_is_open(broker.port)

        async def disconnected() -> bool:
            return not publisher.connected

        await eventually(disconnected, what="the publisher to notice the outage")
        assert await publisher.publish(messages[10:30]) < 20
        assert publisher.in_flight > 0
        broker.start()

        async def drained() -> bool:  # gmqtt reconnected and resent what was queued
            return publisher.in_flight == 0

        await eventually(drained, what="the queued statuses acked after the restart")
        assert await publisher.publish(messages[30:]) == 20
