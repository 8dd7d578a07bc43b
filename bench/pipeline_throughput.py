"""Benchmark: orders/s through the full step chain vs the Redis-side ceiling, in the same run.

Not a test. Starts a private Redis and Mosquitto, then for each scenario
flushes Redis, loads a catalog and appends N orders to the shard streams as
the bridge does:

* ceiling: one consumer (same group settings, same batch size) reads and acks
  every entry and does nothing else;
* pipeline with 1 and with 2 worker processes (``order-pipeline worker``),
  simulated gateway at zero latency, statuses published to the real broker
  (servicekit.mqtt, the cloud's own client);
* a diagnostic row: the same chain in-process with status publishing off and
  batches run one after the other (the worker overlaps a batch's PUBACK wait
  with the next batch, so the full pipeline can beat this row).

Pipeline time runs from the first to the last event in ``orders:events``
(Redis clock), so process start-up is not counted.

    .venv/bin/python bench/pipeline_throughput.py --orders 20000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from fleet.servers import MosquittoProcess, RedisProcess
from pipeline._lua import Scripts
from pipeline.catalog import Catalog, CatalogItem, store_catalog
from pipeline.config import PipelineConfig
from pipeline.metrics import WorkerMetrics
from pipeline.names import EVENTS_STREAM
from pipeline.steps import StepDeps, build_chain
from pipeline.worker import Worker
from schemas import Item, Order, Status, encode
from schemas.names import DEFAULT_SHARDS, shard_of, stream_key
from servicekit.clock import now_ms

CEILING_GROUP = "ceiling"


def make_orders(count: int, devices: int) -> list[Order]:
    """``count`` one-line orders spread over ``devices`` devices."""
    now = now_ms()
    return [
        Order(
            v=1,
            order_id=uuid.uuid4().hex,
            device_id=f"bench-{i % devices}",
            seq=i // devices,
            created_at=now,
            currency="EUR",
            items=(Item("COLA-33", 1, 150),),
            total=150,
        )
        for i in range(count)
    ]


async def prepare(client: aioredis.Redis, orders: list[Order], shards: int) -> None:
    """Empty Redis, load the catalog, append the orders as the bridge would."""
    await client.flushall()
    catalog = Catalog(items={"COLA-33": CatalogItem(price=150, stock=10**9)}, currency="EUR")
    await store_catalog(client, catalog)
    now = now_ms()
    for start in range(0, len(orders), 2000):
        async with client.pipeline(transaction=False) as pipe:
            for order in orders[start : start + 2000]:
                pipe.xadd(
                    stream_key(shard_of(order.device_id, shards)),
                    {"order_id": order.order_id, "device_id": order.device_id, "seq": order.seq,
                     "received_at": now, "payload": encode(order)},
                )  # fmt: skip
            await pipe.execute()


async def ceiling(client: aioredis.Redis, total: int, shards: int, batch: int) -> float:
    """Orders/s for XREADGROUP + XACK of every entry with no work in between."""
    streams = [stream_key(s) for s in range(shards)]
    for stream in streams:
        await client.xgroup_create(stream, CEILING_GROUP, id="0", mkstream=True)
    done = 0
    started = time.perf_counter()
    while done < total:
        reply = await client.xreadgroup(
            CEILING_GROUP, "c1", dict.fromkeys(streams, ">"), count=batch, block=100
        )
        async with client.pipeline(transaction=False) as pipe:
            for stream, rows in reply or []:
                pipe.xack(stream, CEILING_GROUP, *[entry_id for entry_id, _f in rows])
                done += len(rows)
            await pipe.execute()
    return total / (time.perf_counter() - started)


def _spawn_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "worker"], env=env, stdout=out, stderr=out
        )


async def pipeline_rate(
    client: aioredis.Redis, total: int, workers: int, env: dict[str, str], log: Path
) -> float:
    """Orders/s through ``workers`` worker processes, first to last event (Redis clock)."""
    procs = [_spawn_worker(env, log) for _ in range(workers)]
    try:
        # Each order writes 5 events: received, validated, reserved, confirmed, fulfilled.
        while await client.xlen(EVENTS_STREAM) < total * 5:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a worker exited; see {log}")
            await asyncio.sleep(0.2)
        first = await client.xrange(EVENTS_STREAM, count=1)
        last = await client.xrevrange(EVENTS_STREAM, count=1)
        span_ms = int(last[0][0].split(b"-")[0]) - int(first[0][0].split(b"-")[0])
        return total / max(span_ms / 1000, 1e-3)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


class _NullPublisher:
    """Diagnostic only: accepts statuses without sending them."""

    async def publish(self, messages: list[tuple[str, Status]]) -> int:
        return len(messages)


async def chain_without_mqtt(client: aioredis.Redis, total: int, config: PipelineConfig) -> float:
    """Diagnostic: the same chain in this process with status publishing switched off."""
    scripts = Scripts()
    chain = build_chain(config.steps, StepDeps(client, scripts, config))
    worker = Worker(client, _NullPublisher(), chain, config, WorkerMetrics(CollectorRegistry()),
                    scripts=scripts)  # fmt: skip
    await worker.setup()
    done = 0
    started = time.perf_counter()
    while done < total:
        entries = await worker.read()
        await worker.process(entries)
        done += len(entries)
    return total / (time.perf_counter() - started)


async def run(args: argparse.Namespace) -> None:
    """All scenarios, then the table."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp,
        RedisProcess(Path(tmp) / "redis") as redis_server,
        MosquittoProcess(Path(tmp) / "mosquitto") as broker,
    ):
        client = aioredis.Redis.from_url(redis_server.url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERS_")}
        env.update({
            "ORDERS_REDIS_URL": redis_server.url, "ORDERS_MQTT_URL": broker.url,
            "ORDERS_SHARDS": str(args.shards), "ORDERS_BATCH_SIZE": str(args.batch),
            "ORDERS_GATEWAY_LATENCY_MS": "0", "ORDERS_LOG_LEVEL": "warning",
        })  # fmt: skip
        orders = make_orders(args.orders, args.devices)
        results: dict[str, float] = {}
        await prepare(client, orders, args.shards)
        results["ceiling (read+ack, no work)"] = await ceiling(
            client, args.orders, args.shards, args.batch
        )
        await prepare(client, orders, args.shards)
        config = PipelineConfig(redis_url=redis_server.url, shards=args.shards,
                                batch_size=args.batch, consumer="bench")  # fmt: skip
        results["diagnostic: 1 worker, no status publishing"] = await chain_without_mqtt(
            client, args.orders, config
        )
        for workers in args.workers:
            await prepare(client, orders, args.shards)
            results[f"pipeline, {workers} worker process(es)"] = await pipeline_rate(
                client, args.orders, workers, env, Path(tmp) / "workers.log"
            )
        await client.aclose()
    base = results["ceiling (read+ack, no work)"]
    print(f"orders={args.orders} devices={args.devices} shards={args.shards} batch={args.batch}")
    print(f"{'scenario':40} {'orders/s':>10} {'vs ceiling':>11}")
    for name, rate in results.items():
        print(f"{name:40} {rate:10.0f} {rate / base:10.1%}")


def main() -> None:
    """Parse flags and run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--orders", type=int, default=20_000)
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--shards", type=int, default=DEFAULT_SHARDS)
    parser.add_argument("--batch", type=int, default=100, help="XREADGROUP COUNT per shard")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
