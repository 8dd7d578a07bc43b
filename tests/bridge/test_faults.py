"""The bridge as a real process under faults: SIGKILL, Redis outage, replicas, SIGTERM.

Every test uses a private broker so that no persistent session of another
test shares its subscription.
"""

from __future__ import annotations

import random
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis

from schemas import MAX_ORDER_BYTES, Reason, encode
from schemas.names import DLQ_STREAM, orders_topic
from testrig.servers import MosquittoProcess, RedisProcess, port_is_open
from tests.bridge.conftest import BridgeProcess, Publisher, ReceiptCollector, stream_entries
from tests.helpers import make_order, wait_until_blocking

BridgeFactory = Callable[..., BridgeProcess]
SEED = 20261122


def metric(bridge: BridgeProcess, name: str) -> float:
    """One sample of the bridge's /metrics page (0 when absent)."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", bridge.metrics(), re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def orders_for(devices: list[str], per_device: int) -> list[tuple[str, bytes]]:
    """(topic, payload) of ``per_device`` orders for each device, interleaved by seq."""
    return [
        (orders_topic(device), encode(make_order(device, seq)))
        for seq in range(per_device)
        for device in devices
    ]


def bad_messages(devices: list[str]) -> list[tuple[str, bytes, str]]:
    """Garbage and spoofed messages with the reason each must get."""
    bad: list[tuple[str, bytes, str]] = []
    for index, device in enumerate(devices[:20]):
        bad.append((orders_topic(device), b"garbage-%d" % index, Reason.MALFORMED))
        spoofed = encode(make_order(f"victim-{index}", index))
        bad.append((orders_topic(device), spoofed, Reason.DEVICE_MISMATCH))
    bad.append((orders_topic(devices[0]), b"\x81" + b"x" * (17 * 1024), Reason.TOO_LARGE))
    return bad


def shared_group() -> str:
    """A share group no other test uses."""
    return f"g{uuid.uuid4().hex[:8]}"


def assert_exactly_once(client: redis.Redis, expected: set[tuple[str, str]]) -> None:
    """Every expected (device_id, order_id) is in the streams exactly once, nothing else."""
    seen = [
        (fields[b"device_id"].decode(), fields[b"order_id"].decode())
        for fields in stream_entries(client)
    ]
    assert len(seen) == len(set(seen)), "duplicate stream entries"
    assert set(seen) == expected


def run_sigkill_restart(
    mosquitto_factory: Callable[..., MosquittoProcess],
    bridge_factory: BridgeFactory,
    redis_url: str,
    total_orders: int,
) -> None:
    """Orders, copies and garbage with the bridge SIGKILLed and restarted mid-stream."""
    broker = mosquitto_factory()
    devices = [f"dev-{index:03d}-{uuid.uuid4().hex[:6]}" for index in range(100)]
    orders = orders_for(devices, total_orders // 100)
    bad = bad_messages(devices)
    # Each order twice, garbage mixed in, in a seeded random order.
    traffic: list[tuple[str, bytes]] = [*orders, *[(t, p) for t, p, _ in bad], *orders]
    random.Random(SEED).shuffle(traffic)
    half = len(traffic) // 2
    group = shared_group()
    collector = ReceiptCollector(broker.url)
    publisher = Publisher(broker.url)
    bridge = bridge_factory(broker.url, redis_url, "--share-group", group)
    bridge.start()
    try:
        with redis.Redis.from_url(redis_url) as client:
            for topic, payload in traffic[:half]:
                publisher.publish(topic, payload)
            wait_until_blocking(
                lambda: len(stream_entries(client)) > total_orders // 10, 60, "first entries"
            )
            bridge.kill()
            assert len(stream_entries(client)) < total_orders, "killed too late to prove much"
            for topic, payload in traffic[half:]:
                publisher.publish(topic, payload)
            publisher.wait_all()
            restarted = bridge_factory(broker.url, redis_url, "--share-group", group)
            restarted.client_id = bridge.client_id
            restarted.argv[restarted.argv.index("--client-id") + 1] = bridge.client_id
            restarted.start()
            wait_until_blocking(
                lambda: len(stream_entries(client)) >= total_orders, 120, "all entries"
            )
            wait_until_blocking(lambda: client.xlen(DLQ_STREAM) >= len(bad), 60, "all dead letters")
            expected = {
                (device, f"o-{device}-{seq:06d}")
                for device in devices
                for seq in range(total_orders // 100)
            }

            def all_receipted() -> bool:
                settled = {
                    (device, r.order_id)
                    for device, r in collector.snapshot()
                    if r.result in ("accepted", "duplicate")
                }
                return expected <= settled

            wait_until_blocking(all_receipted, 60, "a receipt for every order")

            def rejections() -> list[Any]:
                return [r for _, r in collector.snapshot() if r.result == "rejected"]

            wait_until_blocking(
                lambda: len(rejections()) >= len(bad),
                30,
                f"a receipt for every bad message: {len(bad)} sent, "
                f"{client.xlen(DLQ_STREAM)} dead letters",
            )
            assert_exactly_once(client, expected)
            dlq = {
                (fields[b"topic"].decode(), fields[b"payload"], fields[b"reason"].decode())
                for _, fields in client.xrange(DLQ_STREAM)
            }
            # The DLQ keeps at most 16 KiB of a payload (and its size): too_large is cut.
            assert {(t, p[:MAX_ORDER_BYTES], r) for t, p, r in bad} <= dlq
            sizes = [f.get(b"size") for _, f in client.xrange(DLQ_STREAM)]
            assert str(17 * 1024 + 1).encode() in sizes
            rejected = rejections()
            assert {r.reason for r in rejected} == {
                Reason.MALFORMED,
                Reason.DEVICE_MISMATCH,
                Reason.TOO_LARGE,
            }
            assert any(r.order_id is None for r in rejected)
            assert restarted.terminate() == 0
    finally:
        publisher.close()
        collector.close()


def test_sigkill_mid_stream_loses_and_duplicates_nothing(
    mosquitto_factory: Callable[..., MosquittoProcess],
    bridge_factory: BridgeFactory,
    redis_url: str,
) -> None:
    """2,000 orders sent twice plus garbage, bridge SIGKILLed mid-stream: exactly-once entries."""
    run_sigkill_restart(mosquitto_factory, bridge_factory, redis_url, 2_000)


@pytest.mark.slow
def test_sigkill_mid_stream_full_size(
    mosquitto_factory: Callable[..., MosquittoProcess],
    bridge_factory: BridgeFactory,
    redis_url: str,
) -> None:
    """The issue's full size: 10,000 orders from 100 devices, each twice, SIGKILL mid-stream."""
    run_sigkill_restart(mosquitto_factory, bridge_factory, redis_url, 10_000)


def test_sigkill_between_receive_and_append_redelivers(
    mosquitto_factory: Callable[..., MosquittoProcess],
    redis_factory: Callable[..., RedisProcess],
    bridge_factory: BridgeFactory,
) -> None:
    """Killed holding received, unwritten orders: nothing was acked, the broker redelivers."""
    broker = mosquitto_factory()
    store = redis_factory()
    group = shared_group()
    bridge = bridge_factory(broker.url, store.url, "--share-group", group)
    bridge.start()
    publisher = Publisher(broker.url)
    client = redis.Redis.from_url(store.url)
    try:
        # Writes (EVAL, XADD) block; reads and PING still work.
        client.client_pause(60_000, all=False)  # CLIENT PAUSE 60000 WRITE
        for seq in range(20):
            publisher.publish(orders_topic("dev-k"), encode(make_order("dev-k", seq)))
        publisher.wait_all()
        wait_until_blocking(
            lambda: metric(bridge, "bridge_received_total") >= 20, 30, "all received"
        )
        assert metric(bridge, "bridge_accepted_total") == 0
        assert stream_entries(client) == []
        bridge.kill()
        client.client_unpause()
        assert stream_entries(client) == []
        again = bridge_factory(broker.url, store.url, "--share-group", group)
        again.argv[again.argv.index("--client-id") + 1] = bridge.client_id
        again.start()
        wait_until_blocking(lambda: len(stream_entries(client)) == 20, 30, "redelivered orders")
        assert_exactly_once(client, {("dev-k", f"o-dev-k-{seq:06d}") for seq in range(20)})
    finally:
        publisher.close()
        client.close()


def test_redis_outage_no_loss_no_dup_and_recovery(
    mosquitto_factory: Callable[..., MosquittoProcess],
    redis_factory: Callable[..., RedisProcess],
    bridge_factory: BridgeFactory,
) -> None:
    """Redis stopped ~10 s mid-stream: bridge reports unhealthy, holds bounded work, recovers."""
    broker = mosquitto_factory()
    store = redis_factory(appendonly=True)
    receive_maximum = 200
    bridge = bridge_factory(
        broker.url,
        store.url,
        "--share-group", shared_group(),
        "--receive-maximum", str(receive_maximum),
        "--backoff-max-s", "0.5",
    )  # fmt: skip
    bridge.start()
    devices = [f"dev-o{index}" for index in range(20)]
    orders = orders_for(devices, 100)
    publisher = Publisher(broker.url)
    stop_publishing = threading.Event()

    def publish_slowly() -> None:
        for topic, payload in orders:
            if stop_publishing.is_set():
                return
            publisher.publish(topic, payload)
            publisher.publish(topic, payload)
            time.sleep(0.004)

    feeder = threading.Thread(target=publish_slowly, name="feeder")
    feeder.start()
    client = redis.Redis.from_url(store.url)
    try:
        wait_until_blocking(lambda: len(stream_entries(client)) >= 200, 30, "traffic flowing")
        store.stop()
        assert not port_is_open(store.port)
        wait_until_blocking(
            lambda: bridge.status("/healthz") == 503, 15, "bridge reports unhealthy"
        )
        outage_end = time.monotonic() + 10
        max_in_flight = 0.0
        while time.monotonic() < outage_end:
            max_in_flight = max(max_in_flight, metric(bridge, "bridge_in_flight"))
            time.sleep(0.2)
        assert bridge.process is not None
        assert bridge.process.poll() is None, "bridge died during the outage"
        assert 0 < max_in_flight <= receive_maximum
        store.start()
        feeder.join(60)
        publisher.wait_all()
        wait_until_blocking(
            lambda: len(stream_entries(client)) >= len(orders), 60, "all orders after outage"
        )
        wait_until_blocking(lambda: bridge.status("/healthz") == 200, 15, "bridge healthy again")
        assert_exactly_once(
            client, {(d, f"o-{d}-{seq:06d}") for d in devices for seq in range(100)}
        )
    finally:
        stop_publishing.set()
        feeder.join(10)
        publisher.close()
        client.close()


def test_two_replicas_split_the_load_exactly_once(
    mosquitto_factory: Callable[..., MosquittoProcess],
    bridge_factory: BridgeFactory,
    redis_url: str,
) -> None:
    """Two bridges on one shared subscription both work, and entries stay exactly-once."""
    broker = mosquitto_factory()
    group = shared_group()
    first = bridge_factory(broker.url, redis_url, "--share-group", group)
    second = bridge_factory(broker.url, redis_url, "--share-group", group)
    first.start()
    second.start()
    devices = [f"dev-r{index}" for index in range(50)]
    orders = orders_for(devices, 40)
    publisher = Publisher(broker.url)
    try:
        for topic, payload in [*orders, *orders]:
            publisher.publish(topic, payload)
        publisher.wait_all()
        with redis.Redis.from_url(redis_url) as client:
            wait_until_blocking(
                lambda: len(stream_entries(client)) >= len(orders), 60, "all orders"
            )
            received = [metric(b, "bridge_received_total") for b in (first, second)]
            assert all(count > 0 for count in received), received
            wait_until_blocking(
                lambda: (
                    sum(metric(b, "bridge_received_total") for b in (first, second))
                    >= 2 * len(orders)
                ),
                30,
                "every copy received",
            )
            assert_exactly_once(
                client, {(d, f"o-{d}-{seq:06d}") for d in devices for seq in range(40)}
            )
        assert first.terminate() == 0
        assert second.terminate() == 0
    finally:
        publisher.close()


def test_sigterm_drains_and_exits_cleanly(
    mqtt_url: str, bridge_factory: BridgeFactory, redis_url: str, device_id: str
) -> None:
    """Ops endpoints answer, then SIGTERM exits 0 after writing what was received."""
    bridge = bridge_factory(mqtt_url, redis_url, "--share-group", shared_group())
    bridge.start()
    assert bridge.status("/healthz") == 200
    page = bridge.metrics()
    for name in ("bridge_received_total", "bridge_batch_size_bucket", "bridge_redis_rtt_seconds"):
        assert name in page
    publisher = Publisher(mqtt_url)
    try:
        for seq in range(300):
            publisher.publish(orders_topic(device_id), encode(make_order(device_id, seq)))
        publisher.wait_all()
        with redis.Redis.from_url(redis_url) as client:
            wait_until_blocking(lambda: len(stream_entries(client)) == 300, 30, "orders stored")
        # Redis holds an entry before the bridge has read the reply and counted it.
        accepted = "bridge_accepted_total"
        wait_until_blocking(lambda: metric(bridge, accepted) >= 300, 30, "orders counted")
        assert metric(bridge, accepted) == 300
        assert bridge.terminate() == 0
        assert '"msg": "bridge stopped"' in bridge.log_path.read_text()
    finally:
        publisher.close()


def test_broker_restart_bridge_reconnects_and_loses_nothing(
    mosquitto_factory: Callable[..., MosquittoProcess],
    bridge_factory: BridgeFactory,
    redis_url: str,
) -> None:
    """The broker (with persistence) is SIGKILLed and restarted; the bridge reconnects by itself."""
    broker = mosquitto_factory(persistence=True)
    bridge = bridge_factory(
        broker.url, redis_url, "--share-group", shared_group(), "--backoff-max-s", "0.5"
    )
    bridge.with_args("--mqtt-keepalive-s", "2").start()
    devices = [f"dev-b{index}" for index in range(10)]
    first, second = orders_for(devices, 30), orders_for(devices, 60)[300:]
    publisher = Publisher(broker.url)
    client = redis.Redis.from_url(redis_url)
    try:
        for topic, payload in first:
            publisher.publish(topic, payload)
        publisher.wait_all()
        wait_until_blocking(
            lambda: len(stream_entries(client)) == len(first), 30, "first half stored"
        )
        publisher.close()
        time.sleep(3)  # idle past the 2 s keep-alive: PINGREQs keep the session up
        assert bridge.status("/healthz") == 200
        broker.kill()
        assert not port_is_open(broker.port)
        wait_until_blocking(
            lambda: bridge.status("/healthz") == 503, 15, "bridge notices the broker is gone"
        )
        broker.start()
        wait_until_blocking(lambda: bridge.status("/readyz") == 200, 30, "bridge reconnected")
        publisher = Publisher(broker.url)
        for topic, payload in second:
            publisher.publish(topic, payload)
        publisher.wait_all()
        wait_until_blocking(lambda: len(stream_entries(client)) == 600, 30, "second half stored")
        assert_exactly_once(client, {(d, f"o-{d}-{seq:06d}") for d in devices for seq in range(60)})
        assert bridge.terminate() == 0
    finally:
        publisher.close()
        client.close()
