"""One bridge on two brokers: orders from both, each receipt back on its order's broker,
and a dead broker neither stops the bridge nor makes it unready."""

from __future__ import annotations

from collections.abc import Callable

import redis

from schemas import encode
from schemas.names import orders_topic
from testrig.servers import MosquittoProcess, port_is_open
from tests.helpers import make_order, wait_until_blocking

from .conftest import BridgeProcess, Publisher, ReceiptCollector, stream_entries


def test_a_bridge_takes_orders_from_each_broker_and_answers_on_it(
    mosquitto_factory: Callable[..., MosquittoProcess],
    redis_url: str,
    bridge_factory: Callable[..., BridgeProcess],
    device_id: str,
) -> None:
    brokers = [mosquitto_factory(), mosquitto_factory()]
    bridge = bridge_factory(f"{brokers[0].url},{brokers[1].url}", redis_url)
    bridge.start()
    devices = [f"{device_id}-a", f"{device_id}-b"]
    collectors = [ReceiptCollector(b.url) for b in brokers]
    publishers = [Publisher(b.url) for b in brokers]
    try:
        for device, pub in zip(devices, publishers, strict=True):
            for seq in range(3):
                pub.publish(orders_topic(device), encode(make_order(device, seq)))
            pub.wait_all()

        def answered() -> bool:
            return all(len(c.snapshot()) >= 3 for c in collectors)

        wait_until_blocking(answered, 20, "three receipts on each broker")
        # Each broker carried only its own device's receipts: none fanned out.
        for device, collector in zip(devices, collectors, strict=True):
            assert {d for d, _ in collector.snapshot()} == {device}
            assert {r.result for _, r in collector.snapshot()} == {"accepted"}

        brokers[0].kill()
        assert not port_is_open(brokers[0].port)  # the fault really happened
        wait_until_blocking(lambda: "mqtt connect failed" in bridge.log_tail(50), 20,
                            "the bridge's failed reconnect to the dead broker")  # fmt: skip
        assert bridge.status("/readyz") == 200  # the other broker still feeds it
        publishers[1].publish(orders_topic(devices[1]), encode(make_order(devices[1], 3)))
        publishers[1].wait_all()
        wait_until_blocking(lambda: len(collectors[1].snapshot()) >= 4, 20, "a fourth receipt")
    finally:
        for collector in collectors:
            collector.close()
        for pub in publishers:
            pub.close()
    with redis.Redis.from_url(redis_url) as client:
        mine = [e for e in stream_entries(client) if e[b"device_id"].decode() in devices]
    assert len(mine) == 7  # each order appended once
