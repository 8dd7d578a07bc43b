"""Pipeline test fixtures: async Redis, a catalog, in-process workers, a status listener."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import CollectorRegistry
from redis.cluster import RedisCluster as SyncCluster

from pipeline._lua import Scripts
from pipeline.catalog import Catalog, CatalogItem, store_catalog
from pipeline.config import PipelineConfig
from pipeline.metrics import WorkerMetrics
from pipeline.records import read_events
from pipeline.service import redis_client
from pipeline.status import MqttStatusPublisher, status_client
from pipeline.steps import StepDeps, build_chain
from pipeline.stock import stock_levels
from pipeline.worker import Worker
from schemas import Status, decode_status
from schemas.names import status_topic
from testrig.servers import MosquittoProcess
from tests.bridge.conftest import running_cluster
from tests.tools import require_tool

TEST_SHARDS = 4
INITIAL_STOCK = {"COLA-33": 1000, "WATER-50": 1000, "RARE-1": 2}
PRICES = {"COLA-33": 150, "WATER-50": 100, "RARE-1": 999}


async def stock_left(client: Any, sku: str, shards: int = TEST_SHARDS) -> int:
    """Units of ``sku`` on hand over all shards (and transfers in flight)."""
    return (await stock_levels(client, shards, [sku]))[sku]


async def all_events(client: Any, shards: int = TEST_SHARDS) -> list[dict[str, str]]:
    """Every entry of every shard's events stream."""
    return [fields async for fields in read_events(client, shards)]


@pytest.fixture(scope="session")
def pipeline_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    """A real 3-master Redis Cluster shared by the pipeline tests; yields the ports."""
    require_tool("redis-cli")
    with running_cluster(tmp_path_factory.mktemp("pipeline-cluster")) as ports:
        yield ports


@pytest.fixture(params=["single"])
def backend(request: pytest.FixtureRequest) -> str:
    """Which Redis the test runs on: ``single`` (default) or ``cluster``.

    A module opts into both with
    ``pytestmark = pytest.mark.parametrize("backend", BACKENDS, indirect=True)``.
    """
    return str(request.param)


BACKENDS = ["single", "cluster"]


@pytest.fixture
def store_url(backend: str, request: pytest.FixtureRequest) -> str:
    """URL of the (emptied) Redis the test runs on: the shared one or the shared cluster."""
    if backend == "single":
        return str(request.getfixturevalue("redis_url"))
    ports: list[int] = request.getfixturevalue("pipeline_cluster")
    with SyncCluster(host="127.0.0.1", port=ports[0]) as client:
        client.flushall(target_nodes=SyncCluster.PRIMARIES)
    return f"redis://127.0.0.1:{ports[0]}/0"


@pytest.fixture
def config(store_url: str, backend: str, mqtt_url: str) -> PipelineConfig:
    """Settings for fast tests: few shards, short blocks, quick reclaim."""
    return PipelineConfig(
        redis_url=store_url,
        redis_cluster=backend == "cluster",
        mqtt_url=mqtt_url,
        shards=TEST_SHARDS,
        block_ms=50,
        claim_idle_ms=300,
        claim_every_ms=100,
        max_deliveries=3,
        payment_backoff_ms=1,
    )


@pytest.fixture
async def aredis(config: PipelineConfig) -> AsyncIterator[Any]:
    """An async client on the (flushed) Redis of the test: a single one or the cluster.

    Typed Any: tests call the same commands on either client.
    """
    client = redis_client(config)
    yield client
    await client.aclose()


@pytest.fixture
async def catalog(aredis: Any) -> dict[str, int]:
    """The test catalog loaded into Redis; returns the initial stock."""
    items = {sku: CatalogItem(price=PRICES[sku], stock=n) for sku, n in INITIAL_STOCK.items()}
    await store_catalog(aredis, Catalog(items=items, currency="EUR"), shards=TEST_SHARDS)
    return dict(INITIAL_STOCK)


WorkerFactory = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def start_worker(aredis: Any, config: PipelineConfig) -> AsyncIterator[WorkerFactory]:
    """Start in-process workers (real Redis, real broker); all stop after the test."""
    stack = contextlib.AsyncExitStack()
    tasks: list[tuple[asyncio.Event, asyncio.Task[None]]] = []
    counter = iter(range(1000))

    async def start(**overrides: Any) -> Worker:
        index = next(counter)
        cfg = msgspec.structs.replace(config, consumer=f"test-{index}", **overrides)
        client = await stack.enter_async_context(
            status_client(cfg, f"pipeline-test-{id(cfg)}-{index}")
        )
        publisher = MqttStatusPublisher(
            client, ack_timeout_s=cfg.status_ack_timeout_s, backlog_max=cfg.status_backlog_max
        )
        scripts = Scripts()
        chain = build_chain(cfg.steps, StepDeps(aredis, scripts, cfg))
        worker = Worker(
            aredis, publisher, chain, cfg, WorkerMetrics(CollectorRegistry()), scripts=scripts
        )
        stop = asyncio.Event()
        tasks.append((stop, asyncio.create_task(worker.run(stop), name=f"worker-{index}")))
        return worker

    async with stack:
        yield start
        for stop, _task in tasks:
            stop.set()
        for _stop, task in tasks:
            await asyncio.wait_for(task, 10)


class StatusListener:
    """A real MQTT subscriber on devices' status topics, collecting decoded Status messages."""

    def __init__(self, broker: MosquittoProcess) -> None:
        self.received: list[tuple[str, Status]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.connect("127.0.0.1", broker.port)
        self._client.loop_start()

    def subscribe(self, device_id: str) -> None:
        """Subscribe to one device's status topic and wait for the SUBACK."""
        self._subscribed.clear()
        self._client.subscribe(status_topic(device_id), qos=1)
        assert self._subscribed.wait(5), "no SUBACK"

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.received.append((msg.topic, decode_status(msg.payload)))

    def statuses(self, order_id: str) -> list[str]:
        """Statuses received so far for one order, in arrival order."""
        with self._lock:
            return [s.status for _t, s in self.received if s.order_id == order_id]

    def close(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def status_listener(mosquitto: MosquittoProcess) -> Iterator[StatusListener]:
    """A subscriber to status topics on the shared broker."""
    listener = StatusListener(mosquitto)
    yield listener
    listener.close()
