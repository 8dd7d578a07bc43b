"""Poison entries: dead-lettered after max_deliveries without blocking the shard; replayed once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import pytest
import redis.asyncio as aioredis

from pipeline.config import PipelineConfig
from pipeline.names import STOCK_KEY
from pipeline.records import OrderContext, load_order
from pipeline.steps import Step, StepDeps, register
from schemas.names import DLQ_STREAM

from .api_client import api_client
from .conftest import INITIAL_STOCK, WorkerFactory, eventually
from .producer import make_order, produce
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
        return await aredis.xlen(DLQ_STREAM) == 1

    await eventually(dead, what="the poison entry in the DLQ")
    dead_letters: Any = await aredis.xrange(DLQ_STREAM)
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
    stuck = await load_order(aredis, poison.device_id, poison.order_id)
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
    # Reserved once before the DLQ, never again after the replay.
    expected = INITIAL_STOCK["COLA-33"] - 2 - len(others)
    assert int(await aredis.hget(STOCK_KEY, "COLA-33") or 0) == expected
