"""Benchmark: Redis bytes per order, per stage (markers, streams, records), measured.

Not a test. Starts a private Redis from redis/redis.conf and drives N orders
through the real code paths, in this process:

1. bridge: :class:`bridge.store.RedisSink` appends them (dedup marker + shard
   stream entry per order), as the bridge does;
2. pipeline: a :class:`pipeline.worker.Worker` runs the default step chain on
   them (record hash holding history and reservation, device and order-id
   indexes, events streams, retention indexes), statuses not published;
3. trimming: the bridge's MINID trim removes the acknowledged stream entries.

Per stage it prints ``used_memory`` growth per order, and per key kind the
average ``MEMORY USAGE`` (sampled), so the figures add up to what a
deployment needs: orders/day × retention × bytes/order.

    .venv/bin/python bench/redis_memory.py --orders 20000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from bridge.ingest import ValidOrder, classify
from bridge.store import RedisSink
from pipeline._lua import Scripts
from pipeline.catalog import Catalog, CatalogItem, store_catalog
from pipeline.config import PipelineConfig
from pipeline.metrics import WorkerMetrics
from pipeline.names import events_key, retention_key
from pipeline.steps import StepDeps, build_chain
from pipeline.worker import Worker
from schemas import Item, Order, Status, encode
from schemas.names import DEDUP_TTL_S, orders_topic, stream_key
from servicekit.clock import now_ms
from testrig.servers import RedisProcess

SHARDS = 16
SAMPLE = 200


class _NoStatuses:
    async def publish(self, messages: list[tuple[str, Status]]) -> int:
        return len(messages)


def make_orders(count: int, devices: int) -> list[ValidOrder]:
    """``count`` two-line orders over ``devices`` devices, classified as the bridge does."""
    now = now_ms()
    out = []
    for index in range(count):
        device = f"device-{index % devices:06d}"
        order = Order(
            v=1, order_id=uuid.uuid4().hex, device_id=device, seq=index // devices,
            created_at=now, currency="EUR",
            items=(Item(sku="COLA-33", qty=1, unit_price=150),
                   Item(sku="WATER-50", qty=2, unit_price=100)),
            total=350,
        )  # fmt: skip
        item = classify(orders_topic(device), encode(order), shards=SHARDS, received_at_ms=now)
        assert isinstance(item, ValidOrder)
        out.append(item)
    return out


async def used(client: aioredis.Redis) -> int:
    """``used_memory`` after a moment to settle."""
    await asyncio.sleep(0.2)
    info: Any = await client.info("memory")
    return int(info["used_memory"])


async def usage(client: aioredis.Redis, pattern: str) -> tuple[int, float]:
    """How many keys match ``pattern`` and their average MEMORY USAGE (sampled)."""
    keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
    if not keys:
        return 0, 0.0
    sample = random.sample(keys, min(SAMPLE, len(keys)))
    sizes = [int(await client.memory_usage(key, samples=0) or 0) for key in sample]
    return len(keys), sum(sizes) / len(sizes)


async def total_usage(client: aioredis.Redis, keys: Sequence[str]) -> int:
    """Sum of MEMORY USAGE over ``keys`` (whole streams, zsets)."""
    return sum([int(await client.memory_usage(key, samples=0) or 0) for key in keys])


async def run(args: argparse.Namespace) -> None:
    """Drive the stages and print the table."""
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        server = RedisProcess.production(Path(tmp) / "redis", maxmemory="4gb",
                                         appendfsync="everysec")  # fmt: skip
        with server:
            client = aioredis.Redis.from_url(server.url)
            n = args.orders
            orders = make_orders(n, args.devices)
            config = PipelineConfig(redis_url=server.url, shards=SHARDS, batch_size=500,
                                    consumer="bench", block_ms=10)  # fmt: skip
            scripts = Scripts()
            chain = build_chain(config.steps, StepDeps(client, scripts, config))
            worker = Worker(client, _NoStatuses(), chain, config,
                            WorkerMetrics(CollectorRegistry()), scripts=scripts)  # fmt: skip
            await worker.setup()
            await store_catalog(client, Catalog(items={
                "COLA-33": CatalogItem(price=150, stock=10 * n),
                "WATER-50": CatalogItem(price=100, stock=10 * n)}), shards=SHARDS)  # fmt: skip
            base = await used(client)

            async with RedisSink(server.url, dedup_ttl_s=DEDUP_TTL_S, dlq_maxlen=1000) as sink:
                for start in range(0, n, 500):
                    await sink.write(orders[start : start + 500], [], trim_shards=set())
                after_bridge = await used(client)
                markers, marker_bytes = await usage(client, "orders:{*}:seen:*")
                streams = [stream_key(shard) for shard in range(SHARDS)]
                stream_bytes = await total_usage(client, streams)
                rows += [
                    ("bridge: used_memory growth / order", (after_bridge - base) / n),
                    ("  dedup marker (MEMORY USAGE, 7-day TTL)", marker_bytes),
                    ("  shard stream entry (until trimmed)", stream_bytes / n),
                ]
                assert markers == n

                done = 0
                while done < n:
                    entries = await worker.read()
                    await worker.process(entries)
                    done += len(entries)
                after_pipeline = await used(client)
                fulfilled = worker.metrics.registry.get_sample_value(  # type: ignore[union-attr]
                    "pipeline_orders_processed_total", {"outcome": "fulfilled"}
                )
                assert fulfilled == n, f"only {fulfilled} of {n} orders fulfilled"
                _, record = await usage(client, "order:*[0-9a-f]")
                _, device_index = await usage(client, "device:*:orders")
                _, id_index = await usage(client, "order-id:*:devices")
                events = await total_usage(client, [events_key(s) for s in range(SHARDS)])
                retention = await total_usage(client, [retention_key(s) for s in range(SHARDS)])
                rows += [
                    ("pipeline: used_memory growth / order", (after_pipeline - after_bridge) / n),
                    ("  record hash (with history and reservation)", record),
                    ("  device index (per order)", device_index * args.devices / n),
                    ("  order-id index set", id_index),
                    ("  events streams (one entry per commit, capped)", events / n),
                    ("  retention index entry", retention / n),
                ]

                await sink.write(orders[:1], [], trim_shards=set(range(SHARDS)))
                for shard in range(SHARDS):  # trim every shard (the bridge does it per batch)
                    await sink.write([o for o in orders if o.shard == shard][:1], [],
                                     trim_shards={shard})  # fmt: skip
                after_trim = await used(client)
                left = sum([int(await client.xlen(s)) for s in streams])
                rows += [
                    (
                        "after the bridge trims acked entries: growth / order",
                        (after_trim - base) / n,
                    ),
                    ("  stream entries left", float(left)),
                ]
            await client.aclose()
    print(f"orders={args.orders} devices={args.devices} shards={SHARDS} (redis/redis.conf)")
    print(f"{'what':58} {'bytes/order':>12}")
    for name, value in rows:
        print(f"{name:58} {value:12,.0f}")


def main() -> None:
    """Parse flags and run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--orders", type=int, default=20_000)
    parser.add_argument("--devices", type=int, default=2_000)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
