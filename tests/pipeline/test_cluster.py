"""The pipeline's Redis layout: one slot per script call, stock partitioned per shard and moved."""

from __future__ import annotations

import re
from typing import Any

import pytest
from structlog.testing import capture_logs

from pipeline._lua import Scripts
from pipeline.catalog import Catalog, CatalogItem, store_catalog
from pipeline.config import PipelineConfig
from pipeline.names import stock_key, transfers_key
from pipeline.stock import settle_transfers, stock_levels
from schemas.names import shard_of, stream_key
from tests.helpers import make_order

from .conftest import BACKENDS, WorkerFactory
from .producer import produce
from .test_worker import wait_status

TAG = re.compile(r"\{([^}]*)\}")
UNTAGGED = {"pipeline:catalog", "pipeline:catalog:meta", "pipeline:dlq"}


def device_in(shard: int, shards: int, prefix: str) -> str:
    """A device id whose orders land in ``shard``."""
    return next(d for i in range(10_000) if shard_of(d := f"{prefix}-{i}", shards) == shard)


@pytest.mark.usefixtures("catalog")
@pytest.mark.parametrize("backend", ["cluster"], indirect=True)
async def test_every_pipeline_key_lives_in_its_shards_slot(
    aredis: Any, config: PipelineConfig, start_worker: WorkerFactory
) -> None:
    """After real traffic on 3 masters, every key carrying shard N's tag hashes to the slot of
    `orders:{N}`, the shards span several nodes, and only the catalog is untagged."""
    orders = [make_order(f"slot-dev-{i}", 0, [("COLA-33", 1, 150)]) for i in range(24)]
    for order in orders:
        await produce(aredis, order, config.shards)
    await start_worker()
    for order in orders:
        await wait_status(aredis, order, "fulfilled")
    keys = [k.decode() async for k in aredis.scan_iter(count=1000)]
    for key in keys:
        match = TAG.search(key)
        if match is None:
            assert key in UNTAGGED, key
            continue
        assert aredis.keyslot(key) == aredis.keyslot(stream_key(int(match[1]))), key
    # Records, both indexes, events, stock and retention were all written (and checked).
    shapes = {TAG.sub("{N}", re.sub(r":[^:{}]+", ":x", key)) for key in keys}
    for shape in ("order:{N}:x:x", "device:{N}:x:x", "order-id:{N}:x:x", "orders:{N}:x",
                  "pipeline:{N}:x"):  # fmt: skip
        assert shape in shapes, (shape, shapes)
    nodes = {aredis.get_node_from_key(stream_key(s)).name for s in range(config.shards)}
    assert len(nodes) > 1


@pytest.mark.usefixtures("catalog")
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_a_short_shard_borrows_stock_from_the_others(
    aredis: Any, config: PipelineConfig, start_worker: WorkerFactory
) -> None:
    """RARE-1's 2 units sit in shards 0 and 1; an order for both from shard 3 is served by
    moving them over; the next one, from shard 2, is out of stock: nothing left anywhere."""
    shards = config.shards
    assert [int(await aredis.hget(stock_key(s), "RARE-1") or 0) for s in range(shards)] == [
        1, 1, 0, 0,
    ]  # fmt: skip
    both = make_order(device_in(3, shards, "rare"), 0, [("RARE-1", 2, 999)])
    late = make_order(device_in(2, shards, "rare"), 0, [("RARE-1", 1, 999)])
    await produce(aredis, both, shards)
    await start_worker()
    await wait_status(aredis, both, "fulfilled")
    await produce(aredis, late, shards)
    record = await wait_status(aredis, late, "rejected")
    assert record["reason"] == "out_of_stock"
    assert (await stock_levels(aredis, shards, ["RARE-1"]))["RARE-1"] == 0
    assert [await aredis.zcard(transfers_key(s)) for s in range(shards)] == [0] * shards


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_a_transfer_left_half_done_is_completed_once(
    aredis: Any, config: PipelineConfig
) -> None:
    """A worker killed between `take` and `give`: the units stay counted (in the donor's log),
    and settling gives them to the target exactly once, however often it runs."""
    scripts = Scripts()
    await aredis.hset(stock_key(0), "A", 10)
    taken = await scripts.run(
        aredis, "take", [stock_key(0), transfers_key(0)], ["t-1", "A", 4, 2, 1]
    )
    assert taken == 4
    assert await aredis.hget(stock_key(0), "A") == b"6"
    assert (await stock_levels(aredis, config.shards, ["A"]))["A"] == 10  # 4 in flight
    assert await settle_transfers(aredis, scripts, shards=config.shards, older_than_ms=0) == 1
    assert await settle_transfers(aredis, scripts, shards=config.shards, older_than_ms=0) == 0
    assert await aredis.hget(stock_key(2), "A") == b"4"
    assert (await stock_levels(aredis, config.shards, ["A"]))["A"] == 10


async def test_a_catalog_loaded_for_another_shard_count_is_reported(
    aredis: Any, config: PipelineConfig, start_worker: WorkerFactory
) -> None:
    """Stock spread over 2 shards while the pipeline runs 4: the worker logs the mismatch
    (parts of absent shards would never be reached)."""
    items = {"COLA-33": CatalogItem(price=150, stock=10)}
    await store_catalog(aredis, Catalog(items=items), shards=2)
    with capture_logs() as logs:
        worker = await start_worker()
        await worker.setup()
    mismatches = [e for e in logs if e["event"] == "catalog_shards_mismatch"]
    assert mismatches
    assert (mismatches[0]["catalog_shards"], mismatches[0]["shards"]) == (2, config.shards)
