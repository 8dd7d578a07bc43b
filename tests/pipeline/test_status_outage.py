"""A broker outage neither stops nor slows processing (real Redis, real Mosquitto killed)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import ResponseError

from pipeline.catalog import Catalog, CatalogItem, store_catalog
from pipeline.config import PipelineConfig
from pipeline.records import order_statuses
from pipeline.status import MqttStatusPublisher
from schemas import Order, encode
from schemas.names import PIPELINE_GROUP, shard_of, stream_key
from servicekit.clock import now_ms
from servicekit.redis_clients import text
from testrig.servers import MosquittoProcess, port_is_open
from tests.helpers import make_order, wait_until

from .conftest import TEST_SHARDS, WorkerFactory

DEVICES = 40
ORDERS_PER_DEVICE = 50  # 2,000 orders per drain
SLOWEST_DOWN_VS_UP = 3.0  # with the broker down, at least a third as fast as with it up


async def prefill(aredis: Any, orders: list[Order]) -> None:
    """XADD every order as the bridge would, in one round trip."""
    async with aredis.pipeline(transaction=False) as pipe:
        for order in orders:
            pipe.xadd(
                stream_key(shard_of(order.device_id, TEST_SHARDS)),
                {"order_id": order.order_id, "device_id": order.device_id, "seq": order.seq,
                 "received_at": now_ms(), "payload": encode(order)},
            )  # fmt: skip
        await pipe.execute()


async def drained(aredis: Any) -> bool:
    """Every entry of every shard delivered to the pipeline's group and acked."""
    for shard in range(TEST_SHARDS):
        try:
            groups = await aredis.xinfo_groups(stream_key(shard))
        except ResponseError:  # the worker has not created the stream yet
            return False
        ours = [g for g in groups if text(g["name"]) == PIPELINE_GROUP]
        if not ours or int(ours[0]["pending"]) or int(ours[0]["lag"] or 0):
            return False
    return True


async def drain(aredis: Any, tag: str, timeout_s: float) -> float:
    """Seconds from pre-filling 2,000 new orders to every one terminal and acked."""
    devices = [f"{tag}-{d:02d}" for d in range(DEVICES)]
    orders = [make_order(device, seq) for device in devices for seq in range(ORDERS_PER_DEVICE)]
    started = time.monotonic()
    await prefill(aredis, orders)
    await wait_until(lambda: drained(aredis), timeout_s, f"the {tag} drain")
    elapsed = time.monotonic() - started
    refs = [(o.device_id, o.order_id) for o in orders]
    statuses = await order_statuses(aredis, refs, shards=TEST_SHARDS)
    assert set(statuses) == {"fulfilled"}
    return elapsed


async def test_the_pipeline_drains_as_fast_with_the_broker_down(
    mosquitto_factory: Callable[..., MosquittoProcess],
    config: PipelineConfig,
    aredis: Any,
    start_worker: WorkerFactory,
) -> None:
    """2,000 orders with the broker up, then 2,000 with it SIGKILLed (port closed): the second
    drain takes at most 3 times as long. The statuses wait in the worker's bounded backlog
    and go out once the broker is back."""
    broker = mosquitto_factory()
    catalog = Catalog(items={"COLA-33": CatalogItem(price=150, stock=1_000_000)})
    await store_catalog(aredis, catalog, shards=TEST_SHARDS)
    assert config.status_ack_timeout_s == 5.0  # what each batch waited before the fix
    worker = await start_worker(mqtt_url=broker.url)
    await wait_until(lambda: drained(aredis), what="the worker's groups")

    up = await drain(aredis, "up", 60)
    broker.kill()
    assert not port_is_open(broker.port)
    down = await drain(aredis, "down", SLOWEST_DOWN_VS_UP * up)
    assert down <= SLOWEST_DOWN_VS_UP * up, (up, down)

    publisher = worker.publisher
    assert isinstance(publisher, MqttStatusPublisher)
    assert publisher.backlog > 0  # the outage was real: statuses are waiting for the broker
    assert publisher.unpublished == 0
    broker.start()
    await wait_until(lambda: publisher.backlog == 0, what="the backlog sent after the restart")
