"""The same bridge and pipeline processes through 10,000 consecutive Redis failures.

Time is compressed with a tiny backoff cap (``--backoff-max-s 0.001``): each
failed try is a refused connection to Redis's closed port, so ten thousand of
them take seconds, not the hours they would at the production cap. Both
processes must stay up, recover by themselves when Redis returns, be back at
work within 2 s, and deliver every order exactly once.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from pipeline import order_statuses
from pipeline.catalog import Catalog, CatalogItem, store_catalog
from pipeline.config import PipelineConfig
from pipeline.names import order_key
from pipeline.records import parse_history
from schemas import encode
from schemas.names import orders_topic
from testrig.servers import MosquittoProcess, RedisProcess, port_is_open
from tests.bridge.conftest import BridgeProcess, Publisher, ReceiptCollector, stream_entries
from tests.helpers import make_order, wait_until_blocking

from .processes import env_for, spawn, stop_all

FAILURES = 10_000
BACK_AT_WORK_S = 2.0
SHARDS = 4


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Pipeline processes of this test; any left running are killed afterwards."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    stop_all(started)


def bridge_failures(bridge: BridgeProcess) -> float:
    """``bridge_redis_errors_total``: failed round trips of the batch writer."""
    match = re.search(r"^bridge_redis_errors_total (\S+)$", bridge.metrics(), re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def readyz(bridge: BridgeProcess) -> str:
    """The body of the bridge's /readyz, for failure messages."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{bridge.http_port}/readyz", timeout=2) as r:
            return str(r.read().decode())
    except urllib.error.HTTPError as exc:
        return str(exc.read().decode())


def worker_failures(log: Path) -> int:
    """The worker's consecutive failure count, from its periodic ``redis_error`` lines."""
    counts = [int(n) for n in re.findall(r'"failures": (\d+)', log.read_text(errors="replace"))]
    return max(counts, default=0)


def statuses(url: str, refs: list[tuple[str, str]]) -> list[str | None]:
    """Current status of each order (None: no record yet)."""

    async def read() -> list[str | None]:
        client = aioredis.Redis.from_url(url)
        try:
            return await order_statuses(client, refs, shards=SHARDS)
        finally:
            await client.aclose()

    return asyncio.run(read())


def test_bridge_and_worker_survive_ten_thousand_redis_failures(
    tmp_path: Path,
    mosquitto_factory: Callable[..., MosquittoProcess],
    processes: list[subprocess.Popen[bytes]],
) -> None:
    """Redis away for 10,000+ tries of each process: both recover within 2 s, nothing lost."""
    broker = mosquitto_factory()
    server = RedisProcess.production(tmp_path / "redis", maxmemory="256mb")
    server.start()
    asyncio.run(_load_catalog(server.url))
    bridge = BridgeProcess(tmp_path, broker.url, server.url, "--backoff-max-s", "0.001",
                           "--redis-require-durable")  # fmt: skip
    config = PipelineConfig(redis_url=server.url, mqtt_url=broker.url, shards=SHARDS,
                            block_ms=50, backoff_max_s=0.001, log_level="info")  # fmt: skip
    worker_log = tmp_path / "worker.log"
    receipts = ReceiptCollector(broker.url)
    publisher = Publisher(broker.url)
    devices = [f"dev-outage-{index}" for index in range(10)]
    before = [(d, encode(make_order(d, seq))) for seq in range(10) for d in devices]
    during = [(d, encode(make_order(d, seq))) for seq in range(10, 30) for d in devices]
    refs = [(d, f"o-{d}-{seq:06d}") for seq in range(30) for d in devices]
    try:
        bridge.start()
        worker = spawn(["worker"], env_for(config), worker_log)
        processes.append(worker)
        for device, payload in before:
            publisher.publish(orders_topic(device), payload)
        publisher.wait_all()
        wait_until_blocking(
            lambda: None not in statuses(server.url, refs[: len(before)]), 60, "warm-up"
        )

        server.stop()
        assert not port_is_open(server.port), "Redis still listening: no outage"
        for device, payload in during:
            publisher.publish(orders_topic(device), payload)
        publisher.wait_all()
        wait_until_blocking(
            lambda: bridge_failures(bridge) >= FAILURES, 180, "10,000 bridge failures"
        )
        wait_until_blocking(
            lambda: worker_failures(worker_log) >= FAILURES, 180, "10,000 worker failures"
        )
        assert bridge.status("/readyz") == 503  # red during the outage (and still alive)
        assert worker.poll() is None, "the worker died during the outage"
        receipted_before = len(receipts.snapshot())
        assert receipted_before == len(before), "an order was receipted while Redis was down"

        server.start()
        back = time.monotonic()
        wait_until_blocking(lambda: len(receipts.snapshot()) > receipted_before, 30, "bridge back")
        bridge_back_s = time.monotonic() - back
        first_ref = refs[len(before) :]
        wait_until_blocking(lambda: any(statuses(server.url, first_ref)), 30, "worker back")
        worker_back_s = time.monotonic() - back
        print(f"back at work after the outage: bridge {bridge_back_s:.2f} s, "
              f"worker {worker_back_s:.2f} s")  # fmt: skip
        assert bridge_back_s < BACK_AT_WORK_S
        assert worker_back_s < BACK_AT_WORK_S

        terminal = {"fulfilled", "rejected", "failed"}
        wait_until_blocking(
            lambda: set(statuses(server.url, refs)) <= terminal, 60, "every order done"
        )
        wait_until_blocking(lambda: len(receipts.snapshot()) >= len(refs), 30, "every receipt")
        assert worker.poll() is None
        wait_until_blocking(
            lambda: bridge.status("/readyz") == 200, 5, f"ready again: {readyz(bridge)}"
        )
        with redis.Redis.from_url(server.url) as client:
            seen = Counter(
                (f[b"device_id"].decode(), f[b"order_id"].decode())
                for f in stream_entries(client, SHARDS)
            )
            assert set(seen) == set(refs)
            assert max(seen.values()) == 1, "an order was appended twice"
            for device, order_id in refs:
                raw = client.hgetall(order_key(device, order_id, SHARDS))
                history = parse_history({k.decode(): v.decode() for k, v in raw.items()})
                finals = [h for h in history if h["status"] == "fulfilled"]
                assert len(finals) == 1, (device, order_id, history)
        assert {r.result for _d, r in receipts.snapshot()} <= {"accepted", "duplicate"}
    finally:
        publisher.close()
        receipts.close()
        bridge.stop()
        server.kill()


async def _load_catalog(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        await store_catalog(
            client, Catalog(items={"COLA-33": CatalogItem(price=150, stock=100_000)}), shards=SHARDS
        )
    finally:
        await client.aclose()
