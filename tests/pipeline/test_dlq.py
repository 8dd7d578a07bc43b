"""Poison entries: dead-lettered after max_deliveries without blocking the shard; replayed once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import pytest
import redis.asyncio as aioredis

from bridge.ingest import DeadLetter as BridgeDeadLetter
from bridge.store import RedisSink
from pipeline._lua import Scripts
from pipeline.config import PipelineConfig
from pipeline.dlq import DeadLetter, dead_letter
from pipeline.names import PIPELINE_DLQ_STREAM
from pipeline.records import OrderContext, StreamEntry, load_order
from pipeline.steps import Step, StepDeps, register
from schemas import Reason
from schemas.names import DLQ_STREAM, orders_topic
from tests.helpers import make_order, wait_until

from .api_client import api_client
from .conftest import BACKENDS, INITIAL_STOCK, WorkerFactory, stock_left
from .producer import produce
from .test_worker import wait_status


class PoisonStep:
    """A step that raises on the orders listed in ``poisoned`` (a bug in a step, say)."""

    name = "poison"
    poisoned: ClassVar[set[str]] = set()

    async def run(self, batch: Sequence[OrderContext]) -> None:
        """Raise if any order of the batch is poisoned; pass the others unchanged."""
        for ctx in batch:
            if ctx.order.order_id in self.poisoned:
                raise RuntimeError(f"poisoned {ctx.order.order_id}")
            ctx.advance()


@register("poison")
def _poison(_deps: StepDeps) -> Step:
    return PoisonStep()


def entry_ms(entry_id: bytes) -> int:
    """The ms timestamp part of a stream entry id."""
    return int(entry_id.split(b"-")[0])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.usefixtures("catalog")
async def test_poison_goes_to_dlq_without_blocking_and_replays_once(
    aredis: aioredis.Redis, config: PipelineConfig, start_worker: WorkerFactory, device_id: str
) -> None:
    """The poison order goes to the DLQ while its shard-mates finish; a replay re-drives it once."""
    poison = make_order(device_id, 0, [("COLA-33", 2, 150)])
    others = [make_order(device_id, seq, [("COLA-33", 1, 150)]) for seq in range(1, 6)]
    PoisonStep.poisoned = {poison.order_id}
    for order in [poison, *others]:
        await produce(aredis, order, config.shards)
    worker = await start_worker(steps="validate,reserve,poison,pay,fulfil")

    async def dead() -> bool:
        return await aredis.xlen(PIPELINE_DLQ_STREAM) == 1

    await wait_until(dead, what="the poison entry in the DLQ")
    assert await aredis.xlen(DLQ_STREAM) == 0  # the intake DLQ is the bridge's, capped
    dead_letters: Any = await aredis.xrange(PIPELINE_DLQ_STREAM)
    ((dlq_id, fields),) = dead_letters
    assert fields[b"reason"] == b"max_deliveries"
    assert fields[b"order_id"] == poison.order_id.encode()
    assert int(fields[b"deliveries"]) == config.max_deliveries + 1
    assert b"poisoned" in fields[b"error"]
    for order in others:
        record = await wait_status(aredis, order, "fulfilled")
        # Its shard-mates were done before the poison entry gave up: nothing waited for it.
        assert record["updated_at"] <= entry_ms(dlq_id)
    registry = worker.metrics.registry
    assert registry is not None
    assert (
        registry.get_sample_value("pipeline_dead_lettered_total", {"reason": "max_deliveries"}) == 1
    )
    assert (registry.get_sample_value("pipeline_reclaimed_total") or 0) >= config.max_deliveries
    assert registry.get_sample_value("pipeline_step_errors_total", {"step": "poison"}) == float(
        config.max_deliveries
    )
    stuck = await load_order(aredis, poison.device_id, poison.order_id, shards=config.shards)
    assert stuck is not None
    assert stuck["status"] == "reserved"

    PoisonStep.poisoned = set()  # the operator deploys the fix
    async with api_client(aredis, config.shards) as http:
        listing = await (await http.get("/v1/dlq")).json()
        assert [item["id"] for item in listing["items"]] == [dlq_id.decode()]
        assert listing["items"][0]["replayable"] is True
        response = await http.post(f"/v1/dlq/{dlq_id.decode()}/replay")
        assert response.status == 202
        replayed_as = (await response.json())["replayed_as"]
        await wait_status(aredis, poison, "fulfilled")
        again = await http.post(f"/v1/dlq/{dlq_id.decode()}/replay")
        assert again.status == 409
        problem = await again.json()
        assert problem["type"] == "urn:iot-orders:problem:already-replayed"
        assert problem["replayed_as"] == replayed_as
    assert await aredis.xlen(PIPELINE_DLQ_STREAM) == 0  # replay emptied it
    # Reserved once before the DLQ, never again after the replay.
    expected = INITIAL_STOCK["COLA-33"] - 2 - len(others)
    assert await stock_left(aredis, "COLA-33") == expected


async def test_garbage_flood_of_twice_the_intake_cap_leaves_every_pipeline_dead_letter(
    aredis: aioredis.Redis, redis_url: str, config: PipelineConfig
) -> None:
    """The bridge floods orders:dlq with 2x its cap; every pipeline dead letter stays replayable."""
    cap = 1000
    letters = [
        DeadLetter(
            StreamEntry(
                "orders:{0}",
                f"7-{i}",
                {"device_id": f"dev-flood-{i}".encode(), "order_id": b"o1", "payload": b"\x01"},
            ),
            "max_deliveries",
            "boom",
        )
        for i in range(20)
    ]
    await aredis.xgroup_create("orders:{0}", "pipeline", id="0", mkstream=True)
    await dead_letter(aredis, Scripts(), letters)
    # Again, as after a kill between the DLQ append and the XACK: no second entry.
    await dead_letter(aredis, Scripts(), letters)
    assert await aredis.xlen(PIPELINE_DLQ_STREAM) == len(letters)
    garbage = [
        BridgeDeadLetter(Reason.MALFORMED, orders_topic("dev-x"), b"junk-%d" % i, i, "dev-x", None)
        for i in range(2 * cap)
    ]
    async with RedisSink(redis_url, dedup_ttl_s=60, dlq_maxlen=cap) as sink:
        for start in range(0, len(garbage), 200):
            await sink.write([], garbage[start : start + 200], trim_shards=set())
    flooded = await aredis.xlen(DLQ_STREAM)
    assert flooded < 2 * cap, "the intake cap never trimmed: the flood proves nothing"
    assert await aredis.xlen(PIPELINE_DLQ_STREAM) == len(letters)
    async with api_client(aredis, config.shards) as http:
        rows: Any = await aredis.xrange(PIPELINE_DLQ_STREAM)
        for entry_id, _fields in rows:
            response = await http.post(f"/v1/dlq/{entry_id.decode()}/replay")
            assert response.status == 202, await response.text()
    assert await aredis.xlen(PIPELINE_DLQ_STREAM) == 0
