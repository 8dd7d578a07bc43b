"""The status publisher on the cloud's MQTT client against a real broker."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry

from pipeline.config import PipelineConfig
from pipeline.status import MqttStatusPublisher, StatusMetrics, status_client
from schemas import Status
from testrig.servers import MosquittoProcess, port_is_open
from tests.helpers import wait_until

from .conftest import StatusListener


def _statuses(device_id: str, count: int, status: str = "confirmed") -> list[tuple[str, Status]]:
    return [
        (device_id, Status(v=1, order_id=f"order-{i:08d}", status=status, reason=None, at=1))  # type: ignore[arg-type]
        for i in range(count)
    ]


async def test_publishes_past_the_brokers_receive_maximum(
    mosquitto: MosquittoProcess, status_listener: StatusListener, device_id: str
) -> None:
    """2,500 statuses (over the broker's Receive Maximum of 1,000) all go out; publish returns
    once the broker acked every one, and a subscriber gets every one."""
    status_listener.subscribe(device_id)
    messages = _statuses(device_id, 2500)
    config = PipelineConfig(mqtt_url=mosquitto.url)
    async with status_client(config, f"{device_id}-pub") as client:
        publisher = MqttStatusPublisher(client)
        assert await publisher.publish(messages) == 2500
        assert await publisher.publish(messages[:10]) == 10
        assert client.in_flight == 0

    async def all_heard() -> bool:
        return len({s.order_id for _t, s in status_listener.received}) == 2500

    await wait_until(all_heard, what="every status at the subscriber")


async def test_a_broker_outage_times_out_then_the_queued_statuses_go_out(
    mosquitto_factory: Callable[..., MosquittoProcess], device_id: str
) -> None:
    """With the broker killed, publish gives up after its timeout and keeps the messages; after
    a restart they are resent, and the next publish returns once those are acked too."""
    broker = mosquitto_factory()
    messages = _statuses(device_id, 50, "fulfilled")
    config = PipelineConfig(mqtt_url=broker.url)
    async with status_client(config, f"{device_id}-pub") as client:
        publisher = MqttStatusPublisher(client, ack_timeout_s=0.5)
        assert await publisher.publish(messages[:10]) == 10
        broker.kill()
        assert not port_is_open(broker.port)

        async def disconnected() -> bool:
            return not client.connected

        await wait_until(disconnected, what="the publisher to notice the outage")
        assert await publisher.publish(messages[10:30]) == 0
        assert client.in_flight == 20
        broker.start()

        async def drained() -> bool:  # reconnected and resent what was queued
            return client.in_flight == 0

        await wait_until(drained, what="the queued statuses acked after the restart")
        assert await publisher.publish(messages[30:]) == 20


async def test_with_the_broker_down_send_never_waits_and_the_backlog_is_bounded(
    mosquitto_factory: Callable[..., MosquittoProcess], device_id: str
) -> None:
    """Broker SIGKILLed: send returns at once with what fits in a backlog of 10; the other 20 are
    counted as unpublished (left to the status query); the 10 go out after a restart."""
    broker = mosquitto_factory()
    listener = StatusListener(broker)
    listener.subscribe(device_id)
    messages = _statuses(device_id, 30, "fulfilled")
    registry = CollectorRegistry()
    config = PipelineConfig(mqtt_url=broker.url, status_backlog_max=10)
    try:
        async with status_client(config, f"{device_id}-pub") as client:
            publisher = MqttStatusPublisher(
                client, backlog_max=config.status_backlog_max, metrics=StatusMetrics(registry)
            )
            broker.kill()
            assert not port_is_open(broker.port)

            async def disconnected() -> bool:
                return not client.connected

            await wait_until(disconnected, what="the publisher to notice the outage")
            assert publisher.send(messages[:4]) == 4
            assert publisher.send(messages[4:]) == 6
            assert publisher.backlog == client.in_flight == 10
            assert publisher.unpublished == 20
            assert _unpublished(registry) == 20
            listener.close()
            broker.start()
            listener = StatusListener(broker)
            listener.subscribe(device_id)
            await wait_until(lambda: publisher.backlog == 0, what="the backlog sent")
            assert publisher.send(messages[10:12]) == 2  # room again

            async def heard() -> bool:
                got = {s.order_id for _t, s in listener.received}
                return got >= {s.order_id for _d, s in messages[10:12]}

            await wait_until(heard, what="the next statuses at a subscriber")
    finally:
        listener.close()


def _unpublished(registry: CollectorRegistry) -> float:
    value = registry.get_sample_value("pipeline_statuses_unpublished_total")
    return 0.0 if value is None else value
