"""Retention: terminal orders expire with their index entries; live orders never do."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from pipeline.config import PipelineConfig
from pipeline.names import device_index_key, order_devices_key, order_key, retention_key
from schemas.names import shard_of
from tests.helpers import make_order

from .conftest import BACKENDS, WorkerFactory
from .producer import produce
from .test_worker import wait_status

# Everything between the fulfilment and the "not due yet" check (the status poll, the TTL
# and index reads) must fit in it: 0.5 s left a loaded 2-core machine too little.
RETENTION_S = 2.0


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.usefixtures("catalog")
async def test_terminal_orders_expire_with_their_index_entries(
    aredis: aioredis.Redis, config: PipelineConfig, start_worker: WorkerFactory, device_id: str
) -> None:
    """--retention-days: the record (with history and reservation) expires; the worker trims
    both indexes."""
    worker = await start_worker(retention_days=RETENTION_S / 86_400)
    order = make_order(device_id, 0, [("COLA-33", 1, 150)])
    await produce(aredis, order, config.shards)
    await wait_status(aredis, order, "fulfilled")
    shard = shard_of(device_id, config.shards)
    retention = retention_key(shard)
    keys = [order_key(device_id, order.order_id, config.shards)]
    for key in keys:
        assert 0 < await aredis.pttl(key) <= RETENTION_S * 1000, key
    assert await aredis.zcard(device_index_key(device_id, config.shards)) == 1
    assert await aredis.zcard(retention) == 1
    assert await worker.forget_expired_orders() == 0  # not due yet: nothing trimmed

    await asyncio.sleep(RETENTION_S + 0.2)
    assert await aredis.exists(*keys) == 0
    assert await worker.forget_expired_orders() == 1
    assert await aredis.exists(device_index_key(device_id, config.shards)) == 0
    assert await aredis.exists(order_devices_key(order.order_id, shard)) == 0
    assert await aredis.zcard(retention) == 0


@pytest.mark.usefixtures("catalog")
async def test_retention_zero_keeps_orders(
    aredis: aioredis.Redis, config: PipelineConfig, start_worker: WorkerFactory, device_id: str
) -> None:
    """--retention-days 0: a fulfilled order keeps its record for ever (no TTL)."""
    await start_worker(retention_days=0)
    order = make_order(device_id, 0, [("COLA-33", 1, 150)])
    await produce(aredis, order, config.shards)
    await wait_status(aredis, order, "fulfilled")
    assert await aredis.pttl(order_key(device_id, order.order_id, config.shards)) == -1
    assert await aredis.zcard(retention_key(shard_of(device_id, config.shards))) == 0
