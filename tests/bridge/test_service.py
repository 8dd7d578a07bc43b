"""Service behaviour through the real process: rate limiting and receipts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis

from bridge.config import BridgeConfig
from bridge.intake import Intake, MessageSink, MqttIntake
from bridge.metrics import BridgeMetrics
from bridge.service import Bridge, build_sink
from schemas import encode
from schemas.names import DLQ_STREAM, orders_topic
from testrig.servers import free_port
from tests.bridge.conftest import BridgeProcess, Publisher, ReceiptCollector, stream_entries
from tests.helpers import make_order, wait_until, wait_until_blocking


def test_rate_limited_orders_get_a_receipt_and_no_entry(
    *,
    mqtt_url: str,
    redis_url: str,
    bridge_factory: Callable[..., BridgeProcess],
    receipts: ReceiptCollector,
    publisher: Publisher,
    device_id: str,
) -> None:
    """Past its burst a device gets rejected/rate_limited receipts; those orders are not stored."""
    bridge = bridge_factory(mqtt_url, redis_url, "--share-group", f"g-{device_id}")
    bridge.with_args("--rate-per-s", "0.01", "--rate-burst", "5").start()
    for seq in range(20):
        publisher.publish(orders_topic(device_id), encode(make_order(device_id, seq)))
    publisher.wait_all()

    def mine() -> list[str]:
        return [f"{r.result}/{r.reason}" for d, r in receipts.snapshot() if d == device_id]

    wait_until_blocking(lambda: len(mine()) == 20, 30, "a receipt per order")
    assert sorted(mine()) == sorted(["accepted/None"] * 5 + ["rejected/rate_limited"] * 15)
    with redis.Redis.from_url(redis_url) as client:
        assert len(stream_entries(client)) == 5
        assert client.xlen(DLQ_STREAM) == 0
    assert bridge.terminate() == 0


async def test_a_full_receipt_queue_costs_no_order(
    *, mqtt_url: str, redis_url: str, publisher: Publisher, device_id: str
) -> None:
    """The intake's queue refuses every receipt (QueueFull, as at 100,000 queued): the bridge
    counts each refused receipt, keeps running, and every order lands exactly once (the agent
    resends for a receipt it misses)."""
    config = BridgeConfig(mqtt_url=mqtt_url, redis_url=redis_url, http_port=free_port(),
                          client_id=f"bridge-{device_id}", share_group=f"g-{device_id}",
                          shards=4, rate_per_s=0, redis_require_durable=False,
                          heartbeat_interval_s=0)  # fmt: skip
    metrics = BridgeMetrics()
    sink = build_sink(config)
    bridge = Bridge(config, sink, metrics)
    intakes: list[MqttIntake] = []

    def full_intake(sink: MessageSink) -> Intake:
        intake = bridge._default_intake(sink)
        assert isinstance(intake, MqttIntake)  # one broker: one intake
        intake._sender.max_queued = 0  # every receipt meets a full queue
        intakes.append(intake)
        return intake

    async with sink:
        await _run_with_full_queue(bridge, full_intake, publisher, device_id, redis_url)
    assert intakes[0].refused == 5


async def _run_with_full_queue(
    bridge: Bridge,
    intake: Callable[[MessageSink], Intake],
    publisher: Publisher,
    device_id: str,
    redis_url: str,
) -> None:
    running = asyncio.create_task(bridge.run(intake))
    await wait_until(lambda: bridge.started, what="bridge started")
    for seq in range(5):
        publisher.publish(orders_topic(device_id), encode(make_order(device_id, seq)))
    with redis.Redis.from_url(redis_url) as client:
        await wait_until(lambda: len(stream_entries(client)) == 5, what="five orders stored",
                         explain=lambda: len(stream_entries(client)))  # fmt: skip
        refused = bridge.metrics.receipts_failed
        await wait_until(lambda: refused._value.get() == 5, what="five receipts refused")
        assert not running.done()
        bridge.request_stop()
        await running
        assert len(stream_entries(client)) == 5
