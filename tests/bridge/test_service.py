"""Service behaviour through the real process: rate limiting and receipts."""

from __future__ import annotations

from collections.abc import Callable

import redis

from schemas import encode
from schemas.names import DLQ_STREAM, orders_topic
from tests.bridge.conftest import BridgeProcess, Publisher, ReceiptCollector, stream_entries
from tests.helpers import make_order, wait_until_blocking


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
