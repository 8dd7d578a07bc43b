"""The worker outlives a Redis crash, and forgets consumers that died holding nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import msgspec
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from pipeline._lua import Scripts
from pipeline.catalog import Catalog, CatalogItem, store_catalog
from pipeline.config import PipelineConfig
from pipeline.metrics import WorkerMetrics
from pipeline.records import load_order
from pipeline.steps import StepDeps, build_chain
from pipeline.worker import Worker
from schemas import Order, Status
from schemas.names import PIPELINE_GROUP, stream_key
from servicekit.redis_clients import client_options
from testrig.servers import RedisProcess, port_is_open
from tests.helpers import make_order, wait_until

from .conftest import TEST_SHARDS, WorkerFactory
from .producer import produce


class NullPublisher:
    """Status sender double (our own Protocol): records what it was given."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Status]] = []

    def send(self, messages: Sequence[tuple[str, Status]]) -> int:
        """Accept everything."""
        self.sent += messages
        return len(messages)


async def test_worker_survives_a_redis_crash_and_carries_on(
    redis_factory: Callable[..., RedisProcess], config: PipelineConfig, device_id: str
) -> None:
    """Redis SIGKILLed under a running worker: it backs off, reconnects, processes new orders."""
    server = redis_factory()
    client = aioredis.Redis.from_url(server.url)
    cfg = msgspec.structs.replace(config, redis_url=server.url, consumer="outage")
    catalog = Catalog(items={"COLA-33": CatalogItem(price=150, stock=10)})
    scripts = Scripts()
    publisher = NullPublisher()
    worker = Worker(client, publisher, build_chain(cfg.steps, StepDeps(client, scripts, cfg)),
                    cfg, WorkerMetrics(CollectorRegistry()), scripts=scripts)  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await store_catalog(client, catalog, shards=cfg.shards)
        first = make_order(device_id, 0)
        await produce(client, first, cfg.shards)
        await wait_until(lambda: _status_is(client, first, "fulfilled"), what="first")
        server.kill()
        assert not port_is_open(server.port)
        await asyncio.sleep(0.3)  # the worker hits the dead server meanwhile
        assert not task.done()
        server.start()  # empty again: no persistence
        async with aioredis.Redis.from_url(server.url) as fresh:
            await store_catalog(fresh, catalog, shards=cfg.shards)
            second = make_order(device_id, 1)
            await produce(fresh, second, cfg.shards)
            await wait_until(lambda: _status_is(fresh, second, "fulfilled"), what="second")
        assert [s.order_id for _d, s in publisher.sent][-1] == second.order_id
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await client.aclose()


async def test_failure_count_resets_after_each_outage(
    redis_factory: Callable[..., RedisProcess], config: PipelineConfig, device_id: str
) -> None:
    """Two outages: after each the failure count and the backoff start from zero again."""
    server = redis_factory()
    client = aioredis.Redis.from_url(server.url, **client_options(5.0))
    cfg = msgspec.structs.replace(config, redis_url=server.url, consumer="resets",
                                  backoff_max_s=0.005)  # fmt: skip
    scripts = Scripts()
    worker = Worker(client, NullPublisher(), build_chain(cfg.steps, StepDeps(client, scripts, cfg)),
                    cfg, WorkerMetrics(CollectorRegistry()), scripts=scripts)  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        for outage in range(2):
            server.kill()
            assert not port_is_open(server.port)
            await wait_until(_at_least(worker, 200), what=f"failures in outage {outage}")
            assert worker.backoff.failures >= 200
            server.start()
            await wait_until(_reset(worker), what=f"reset after outage {outage}")
        assert not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await client.aclose()


def _at_least(worker: Worker, failures: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return worker.failures >= failures

    return check


def _reset(worker: Worker) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return worker.failures == 0 and worker.backoff.failures == 0

    return check


async def test_idle_empty_consumers_are_forgotten(
    aredis: aioredis.Redis, start_worker: WorkerFactory
) -> None:
    """A consumer that holds nothing and stayed idle past the limit is removed from the group."""
    await aredis.xgroup_create(stream_key(0), PIPELINE_GROUP, id="0", mkstream=True)
    await aredis.xgroup_createconsumer(stream_key(0), PIPELINE_GROUP, "long-gone-123")
    await asyncio.sleep(0.05)
    await start_worker(dead_consumer_idle_ms=20)

    async def forgotten() -> bool:
        rows = await aredis.xinfo_consumers(stream_key(0), PIPELINE_GROUP)
        return all(row["name"] != b"long-gone-123" for row in rows)

    await wait_until(forgotten, what="the dead consumer forgotten")


async def _status_is(client: aioredis.Redis, order: Order, status: str) -> bool:
    try:
        record = await load_order(client, order.device_id, order.order_id, shards=TEST_SHARDS)
    except (ConnectionError, OSError):
        return False
    return record is not None and record["status"] == status
