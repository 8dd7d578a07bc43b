"""The worker against real Redis and Mosquitto: the step chain, outcomes, statuses, ordering."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis

from pipeline import order_statuses
from pipeline.config import PipelineConfig
from pipeline.names import PIPELINE_DLQ_STREAM
from pipeline.records import StreamEntry, load_order
from schemas import Order, Status
from schemas.names import PIPELINE_GROUP, shard_of, stream_key
from servicekit.redis_clients import text
from tests.helpers import make_order, wait_until

from .conftest import (
    BACKENDS,
    INITIAL_STOCK,
    TEST_SHARDS,
    StatusListener,
    WorkerFactory,
    all_events,
    stock_left,
)
from .producer import produce, produce_raw

# The contract tests of the worker, on a single Redis and on a 3-master cluster.
pytestmark = pytest.mark.parametrize("backend", BACKENDS, indirect=True)


async def status_of(client: aioredis.Redis, order: Order) -> str | None:
    """The stored status of an order, or None."""
    record = await load_order(client, order.device_id, order.order_id, shards=TEST_SHARDS)
    return None if record is None else str(record["status"])


async def stock(client: aioredis.Redis, sku: str) -> int:
    """Units on hand."""
    return await stock_left(client, sku)


async def wait_status(client: aioredis.Redis, order: Order, status: str) -> dict[str, Any]:
    """Wait until the order reaches ``status``; return its record."""

    async def reached() -> bool:
        return await status_of(client, order) == status

    await wait_until(reached, what=f"{order.order_id} -> {status}")
    record = await load_order(client, order.device_id, order.order_id, shards=TEST_SHARDS)
    assert record is not None
    return record


@pytest.mark.usefixtures("catalog")
async def test_happy_path_fulfils_records_history_and_publishes_status(
    aredis: aioredis.Redis,
    config: PipelineConfig,
    start_worker: WorkerFactory,
    status_listener: StatusListener,
    device_id: str,
) -> None:
    """An order walks the whole chain; the device hears `confirmed`, `fulfilled` via the broker."""
    status_listener.subscribe(device_id)
    order = make_order(device_id, 0, [("COLA-33", 3, 150), ("WATER-50", 2, 100)])
    await produce(aredis, order, config.shards)
    await start_worker()
    record = await wait_status(aredis, order, "fulfilled")
    assert [h["status"] for h in record["history"]] == [
        "received", "validated", "reserved", "confirmed", "fulfilled",
    ]  # fmt: skip
    assert record["steps_done"] == ["fulfil", "pay", "reserve", "validate"]
    assert await stock(aredis, "COLA-33") == INITIAL_STOCK["COLA-33"] - 3
    assert await stock(aredis, "WATER-50") == INITIAL_STOCK["WATER-50"] - 2
    # One event for the batch that took the order all the way, with the path it took.
    events = await all_events(aredis)
    assert [(e["order_id"], e["status"], e["path"]) for e in events] == [
        (order.order_id, "fulfilled", "received>validated>reserved>confirmed>fulfilled"),
    ]

    async def heard() -> bool:
        return status_listener.statuses(order.order_id) == ["confirmed", "fulfilled"]

    await wait_until(heard, what="status messages on the device's status topic")
    stream = stream_key(shard_of(device_id, config.shards))

    async def acked() -> bool:  # the XACK may trail the delivery
        return int((await aredis.xpending(stream, PIPELINE_GROUP))["pending"]) == 0

    await wait_until(acked, what="the entry acked")


@pytest.mark.usefixtures("catalog")
async def test_one_order_id_on_two_devices_is_two_orders(
    aredis: aioredis.Redis, config: PipelineConfig, start_worker: WorkerFactory, device_id: str
) -> None:
    """Order ids are unique per device only: both devices' orders end fulfilled, each with its
    own record and history, and stock is reserved once for each, also on redelivery."""
    orders = [
        make_order(dev, 0, [("COLA-33", qty, 150)], order_id="order-00000001")
        for dev, qty in ((device_id, 2), (f"{device_id}-b", 5))
    ]
    for order in orders:
        await produce(aredis, order, config.shards)
    worker = await start_worker()
    for order in orders:
        record = await wait_status(aredis, order, "fulfilled")
        assert (record["device_id"], record["order_id"]) == (order.device_id, "order-00000001")
        assert record["total"] == order.total
        assert [h["status"] for h in record["history"]].count("reserved") == 1
    assert await stock(aredis, "COLA-33") == INITIAL_STOCK["COLA-33"] - 7
    assert await aredis.xlen(PIPELINE_DLQ_STREAM) == 0
    entries = []
    for order in orders:  # both entries again, as a redelivery
        stream = stream_key(shard_of(order.device_id, config.shards))
        rows: Any = await aredis.xrange(stream)
        for entry_id, fields in rows:
            if fields[b"device_id"].decode() == order.device_id:
                entries.append(StreamEntry(stream, text(entry_id),
                                           {text(k): v for k, v in fields.items()}, 2))  # fmt: skip
    await worker.process(entries)
    assert await stock(aredis, "COLA-33") == INITIAL_STOCK["COLA-33"] - 7
    found = await order_statuses(
        aredis, [(o.device_id, o.order_id) for o in orders], shards=TEST_SHARDS
    )
    assert found == ["fulfilled", "fulfilled"]
    assert await order_statuses(aredis, [(device_id, "order-00000009")], shards=TEST_SHARDS) == [
        None
    ]


@pytest.mark.usefixtures("catalog")
async def test_rejections_keep_stock_and_tell_the_device(
    aredis: aioredis.Redis,
    config: PipelineConfig,
    start_worker: WorkerFactory,
    status_listener: StatusListener,
    device_id: str,
) -> None:
    """Unknown SKU, wrong price, wrong currency and short stock end `rejected` with their reason."""
    status_listener.subscribe(device_id)
    cases = {
        "unknown_sku": make_order(device_id, 0, [("NOPE", 1, 1)]),
        "price_mismatch": make_order(device_id, 1, [("COLA-33", 1, 149)]),
        "currency_mismatch": make_order(device_id, 2, [("COLA-33", 1, 150)], currency="USD"),
        "out_of_stock": make_order(device_id, 3, [("COLA-33", 1, 150), ("RARE-1", 3, 999)]),
    }
    for order in cases.values():
        await produce(aredis, order, config.shards)
    await start_worker()
    for reason, order in cases.items():
        record = await wait_status(aredis, order, "rejected")
        assert record["reason"] == reason
    # All or nothing: the COLA line of the short order was not reserved either.
    assert await stock(aredis, "COLA-33") == INITIAL_STOCK["COLA-33"]
    assert await stock(aredis, "RARE-1") == INITIAL_STOCK["RARE-1"]

    async def heard() -> bool:
        return all(status_listener.statuses(o.order_id) == ["rejected"] for o in cases.values())

    await wait_until(heard, what="rejected statuses")


@pytest.mark.usefixtures("catalog")
async def test_declined_payment_fails_and_releases_stock(
    aredis: aioredis.Redis,
    config: PipelineConfig,
    start_worker: WorkerFactory,
    device_id: str,
) -> None:
    """A permanent decline ends the order `failed` and gives its reservation back."""
    order = make_order(device_id, 0, [("COLA-33", 5, 150)])
    await produce(aredis, order, config.shards)
    await start_worker(gateway_decline_rate=1.0)
    record = await wait_status(aredis, order, "failed")
    assert record["reason"] == "payment_declined"
    assert [h["status"] for h in record["history"]][-2:] == ["reserved", "failed"]
    assert await stock(aredis, "COLA-33") == INITIAL_STOCK["COLA-33"]


@pytest.mark.usefixtures("catalog")
async def test_a_devices_orders_are_served_in_seq_order_within_a_batch(
    aredis: aioredis.Redis,
    config: PipelineConfig,
    start_worker: WorkerFactory,
    device_id: str,
) -> None:
    """Entries appended out of seq order still reserve the scarce SKU in seq order."""
    orders = {seq: make_order(device_id, seq, [("RARE-1", 1, 999)]) for seq in (3, 1, 2)}
    for order in orders.values():
        await produce(aredis, order, config.shards)
    await start_worker()
    assert (await wait_status(aredis, orders[1], "fulfilled"))["seq"] == 1
    assert (await wait_status(aredis, orders[2], "fulfilled"))["seq"] == 2
    assert (await wait_status(aredis, orders[3], "rejected"))["reason"] == "out_of_stock"
    assert await stock(aredis, "RARE-1") == 0


@pytest.mark.usefixtures("catalog")
async def test_redelivered_entries_change_nothing(
    aredis: aioredis.Redis,
    config: PipelineConfig,
    start_worker: WorkerFactory,
    device_id: str,
) -> None:
    """The same entries processed again (a redelivery) reserve nothing and add no transition."""
    order = make_order(device_id, 0, [("COLA-33", 4, 150)])
    await produce(aredis, order, config.shards)
    worker = await start_worker()
    await wait_status(aredis, order, "fulfilled")
    stream = stream_key(shard_of(device_id, config.shards))
    rows: Any = await aredis.xrange(stream)
    entry = StreamEntry(stream, text(rows[0][0]), {text(k): v for k, v in rows[0][1].items()}, 2)
    events_before = len(await all_events(aredis))
    await worker.process([entry, entry])
    assert await stock(aredis, "COLA-33") == INITIAL_STOCK["COLA-33"] - 4
    assert len(await all_events(aredis)) == events_before
    record = await load_order(aredis, order.device_id, order.order_id, shards=TEST_SHARDS)
    assert record is not None
    assert [h["status"] for h in record["history"]].count("fulfilled") == 1


@pytest.mark.usefixtures("catalog")
async def test_a_first_delivery_of_a_stored_order_is_read_and_run_again_at_once(
    aredis: aioredis.Redis,
    config: PipelineConfig,
    start_worker: WorkerFactory,
    device_id: str,
) -> None:
    """An entry delivered once whose order has a record (appended twice, a replayed dead
    letter) is presumed new, found out by the commit, read and settled in the same batch."""
    order = make_order(device_id, 0, [("COLA-33", 4, 150)])
    await produce(aredis, order, config.shards)
    worker = await start_worker()
    await wait_status(aredis, order, "fulfilled")
    events_before = len(await all_events(aredis))
    batches = worker.batches
    await produce(aredis, order, config.shards)  # the same order, a new entry

    async def acked() -> bool:
        stream = stream_key(shard_of(device_id, config.shards))
        pending = await aredis.xpending(stream, PIPELINE_GROUP)
        groups: Any = await aredis.xinfo_groups(stream)
        return worker.batches > batches and pending["pending"] == 0 and groups[0]["lag"] == 0

    await wait_until(acked, what="the second entry acked")
    registry = worker.metrics.registry
    assert registry is not None
    # Settled in its own batch, not left pending for the reclaim path.
    assert (registry.get_sample_value("pipeline_reclaimed_total") or 0) == 0
    assert await stock(aredis, "COLA-33") == INITIAL_STOCK["COLA-33"] - 4
    assert len(await all_events(aredis)) == events_before
    record = await wait_status(aredis, order, "fulfilled")
    assert [h["status"] for h in record["history"]].count("fulfilled") == 1


async def test_undecodable_entry_goes_to_dlq_at_once(
    aredis: aioredis.Redis, config: PipelineConfig, start_worker: WorkerFactory, device_id: str
) -> None:
    """An entry whose payload is not an order is dead-lettered with the codec's reason and acked."""
    await produce_raw(aredis, device_id, "BROKEN0001", 0, b"\xc1not msgpack", shards=config.shards)
    await start_worker()

    async def dead() -> bool:
        return await aredis.xlen(PIPELINE_DLQ_STREAM) == 1

    await wait_until(dead, what="DLQ entry")
    dead_letters: Any = await aredis.xrange(PIPELINE_DLQ_STREAM)
    ((_id, fields),) = dead_letters
    assert fields[b"reason"] == b"malformed"
    assert fields[b"payload"] == b"\xc1not msgpack"
    assert fields[b"stream"] == stream_key(shard_of(device_id, config.shards)).encode()
    pending = await aredis.xpending(stream_key(shard_of(device_id, config.shards)), PIPELINE_GROUP)
    assert pending["pending"] == 0


@pytest.mark.usefixtures("catalog")
async def test_a_reclaimed_entry_publishes_its_stored_statuses_again(
    aredis: aioredis.Redis, config: PipelineConfig, start_worker: WorkerFactory, device_id: str
) -> None:
    """Died after storing, before publishing? The redelivery re-sends the stored statuses."""
    order = make_order(device_id, 0)
    await produce(aredis, order, config.shards)
    worker = await start_worker()
    await wait_status(aredis, order, "fulfilled")
    stream = stream_key(shard_of(device_id, config.shards))

    async def acked() -> bool:  # the worker's own batch is published and done
        return int((await aredis.xpending(stream, PIPELINE_GROUP))["pending"]) == 0

    await wait_until(acked, what="the batch acked")
    sent: list[tuple[str, Status]] = []

    class Recorder:
        def send(self, messages: Sequence[tuple[str, Status]]) -> int:
            sent.extend(messages)
            return len(messages)

    worker.publisher = Recorder()
    entries: Any = await aredis.xrange(stream)
    ((entry_id, fields),) = entries
    redelivered = StreamEntry(stream, text(entry_id), {text(k): v for k, v in fields.items()}, 2)
    await worker.process([redelivered])
    assert [(d, s.order_id, s.status) for d, s in sent] == [
        (device_id, order.order_id, "confirmed"),
        (device_id, order.order_id, "fulfilled"),
    ]
