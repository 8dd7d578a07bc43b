"""A worker batch's Redis round trips (issue 25): at low rates a batch holds one order, and
each round trip (a send on loopback TCP, a wake-up of Redis) is most of what it costs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.asyncio.connection import Connection

from pipeline._lua import Scripts
from pipeline.config import PipelineConfig
from pipeline.metrics import WorkerMetrics
from pipeline.records import load_order
from pipeline.steps import StepDeps, build_chain
from pipeline.worker import Worker
from schemas import Status
from schemas.names import PIPELINE_GROUP, shard_of, stream_key
from tests.helpers import make_order, wait_until

from .conftest import TEST_SHARDS
from .producer import produce

SENDS: list[int] = [0]


class CountingConnection(Connection):
    """Counts sends: one per command, one per pipeline."""

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        SENDS[0] += 1
        await super().send_packed_command(command, check_health)


class Recorder:
    """The worker's StatusSender seam: keeps what it was handed."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Status]] = []

    def send(self, messages: Sequence[tuple[str, Status]]) -> int:
        self.sent += messages
        return len(messages)


@pytest.fixture
async def counted(config: PipelineConfig) -> AsyncIterator[aioredis.Redis]:
    """A client on the test's single Redis whose sends are counted."""
    # The socket timeout outlasts the long blocks of the stop test (as the service's does).
    pool = aioredis.ConnectionPool.from_url(
        config.redis_url, connection_class=CountingConnection, socket_timeout=60
    )
    client = aioredis.Redis(connection_pool=pool)
    yield client
    await client.aclose()
    await pool.aclose()


@pytest.mark.usefixtures("catalog")
async def test_a_batch_costs_three_round_trips_and_its_acks_ride_with_the_next_read(
    aredis: Any, counted: aioredis.Redis, config: PipelineConfig
) -> None:
    """Load with the catalog's prices, reserve, commit; the XACK goes with the next read."""
    cfg = msgspec.structs.replace(config, consumer="counted")
    scripts = Scripts()
    chain = build_chain(cfg.steps, StepDeps(counted, scripts, cfg))
    statuses = Recorder()
    worker = Worker(counted, statuses, chain, cfg, WorkerMetrics(CollectorRegistry()),
                    scripts=scripts)  # fmt: skip
    await worker.setup()
    order = make_order("dev-rt", 0)
    await produce(aredis, order, TEST_SHARDS)
    stream = stream_key(shard_of(order.device_id, TEST_SHARDS))
    entries = await worker.read()
    assert [e.fields["order_id"].decode() for e in entries] == [order.order_id]

    SENDS[0] = 0
    await worker.finish(await worker.settle(entries))
    assert SENDS[0] == 3  # load + catalog, reserve, commit (validate read on its own: 4)
    assert [s.status for _dev, s in statuses.sent] == ["confirmed", "fulfilled"]
    record = await load_order(aredis, order.device_id, order.order_id, shards=TEST_SHARDS)
    assert record is not None
    assert record["status"] == "fulfilled"
    pending: Any = await aredis.xpending(stream, PIPELINE_GROUP)
    assert pending["pending"] == 1  # stored and its statuses handed over, not acked yet

    SENDS[0] = 0
    assert await worker.read() == []  # nothing new: blocks block_ms
    assert SENDS[0] == 1
    pending = await aredis.xpending(stream, PIPELINE_GROUP)
    assert pending["pending"] == 0


@pytest.mark.usefixtures("catalog")
async def test_a_stop_cuts_the_idle_read_short_and_a_batch_still_finishes(
    aredis: Any, counted: aioredis.Redis, config: PipelineConfig
) -> None:
    """An idle worker blocks long (few round trips), yet stops long before its block ends."""
    block_s = 10.0
    cfg = msgspec.structs.replace(config, consumer="stopper", block_ms=round(block_s * 1000))
    scripts = Scripts()
    chain = build_chain(cfg.steps, StepDeps(counted, scripts, cfg))
    worker = Worker(counted, Recorder(), chain, cfg, WorkerMetrics(CollectorRegistry()),
                    scripts=scripts)  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    order = make_order("dev-stop", 0)
    await produce(aredis, order, TEST_SHARDS)

    async def fulfilled() -> bool:
        record = await load_order(aredis, order.device_id, order.order_id, shards=TEST_SHARDS)
        return record is not None and record["status"] == "fulfilled"

    await wait_until(fulfilled, what="the order fulfilled")

    async def idle_reading() -> bool:
        return worker._reading

    await wait_until(idle_reading, what="the worker blocked on empty streams")
    blocked = time.monotonic()
    stop.set()
    await asyncio.wait_for(task, block_s)
    assert time.monotonic() - blocked < block_s / 4  # cut short, not waited out
    assert task.exception() is None
    stream = stream_key(shard_of(order.device_id, TEST_SHARDS))
    pending: Any = await aredis.xpending(stream, PIPELINE_GROUP)
    assert pending["pending"] == 0  # its batch was acked on the way out
