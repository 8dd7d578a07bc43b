"""A worker's statuses with two brokers: each status reaches the device on either broker,
and a dead broker makes the worker shed nothing the live one would deliver."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from pipeline.brokers import StatusFanout
from pipeline.config import PipelineConfig
from pipeline.status import MqttStatusPublisher, StatusMetrics, status_client
from schemas import Status
from servicekit.urls import MqttUrl
from testrig.servers import MosquittoProcess, port_is_open
from tests.helpers import wait_until

from .conftest import StatusListener

BACKLOG = 50


def _statuses(device_id: str, first: int, count: int) -> list[tuple[str, Status]]:
    return [
        (device_id, Status(v=1, order_id=f"order-{i:08d}", status="fulfilled", reason=None, at=1))
        for i in range(first, first + count)
    ]


async def test_statuses_reach_either_broker_and_a_dead_one_sheds_nothing(
    mosquitto_factory: Callable[..., MosquittoProcess], device_id: str
) -> None:
    brokers = [mosquitto_factory(), mosquitto_factory()]
    config = PipelineConfig(mqtt_url=",".join(b.url for b in brokers), status_backlog_max=BACKLOG)
    device_on = [f"{device_id}-on0", f"{device_id}-on1"]
    listeners = [StatusListener(b) for b in brokers]
    for listener, device in zip(listeners, device_on, strict=True):
        listener.subscribe(device)
    clients = [status_client(config, f"{device_id}-w", url=MqttUrl.parse(b.url)) for b in brokers]
    try:
        async with contextlib.AsyncExitStack() as stack:
            for client in clients:
                await stack.enter_async_context(client)
            publisher = MqttStatusPublisher(
                StatusFanout(clients), backlog_max=BACKLOG,
                metrics=StatusMetrics(CollectorRegistry()),
            )  # fmt: skip
            for device in device_on:
                assert publisher.send(_statuses(device, 0, 10)) == 10

            async def each_heard_its_own() -> bool:
                return all(len(listener.received) == 10 for listener in listeners)

            await wait_until(each_heard_its_own, 10, "10 statuses at each broker's device")

            brokers[0].kill()
            assert not port_is_open(brokers[0].port)  # the fault really happened

            async def noticed() -> bool:
                return not clients[0].connected

            await wait_until(noticed, 10, "the worker's client saw broker 0 go")
            # Four times the backlog, in batches: the dead broker's client fills up,
            # the live one keeps delivering, and nothing is shed.
            for first in range(0, 4 * BACKLOG, 10):
                assert publisher.send(_statuses(device_on[1], 10 + first, 10)) == 10

                async def drained(n: int = 20 + first) -> bool:
                    return len(listeners[1].received) == n

                await wait_until(drained, 10, "the live broker's device heard the batch")
            assert publisher.unpublished == 0
            assert clients[0].in_flight >= BACKLOG  # the dead broker's share waits (or was refused)
    finally:
        for listener in listeners:
            listener.close()
