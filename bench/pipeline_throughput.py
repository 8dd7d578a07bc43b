"""Benchmark: the pipeline's orders/s and CPU per order, against a ceiling and a naive pipeline.

Not a test. Starts a private Redis, a private 3-master Redis Cluster and a
Mosquitto, and for each backend runs, on the same orders (one line each, 16
shards, appended as the bridge does):

* ceiling: one consumer (in this process) that reads (XREADGROUP, ``--batch``
  per shard) and acks every entry and does nothing else;
* naive: the pipeline as a user would first write it, in this process: one
  XREADGROUP COUNT 1 per order, the catalog checked, stock taken and each of
  five transitions stored (HSET, RPUSH, XADD) with one command each, both
  statuses published and their PUBACKs awaited one by one, one XACK per order;
* pipeline with 1, 2 and 4 worker processes (``order-pipeline worker``,
  ``--redis-cluster`` on the cluster), the simulated gateway at zero latency,
  statuses to the real broker;
* with ``--broker-down``, one worker process whose broker URL has nothing
  listening (processing must not wait on the broker: about the 1-worker rate).

Each row gives orders/s (wall clock from the first append, or the first read
for the ceiling, until every entry is acked), the ratio to the same backend's
ceiling and naive rows, and CPU per order: Redis (Σ ``used_cpu_sys`` +
``used_cpu_user`` of every node, less the cost of appending the orders, which
is measured on its own) and consumer (the worker processes' user + system
time from ``/proc``, taken once they idle on empty streams, so start-up is not
counted; the bench process itself for the ceiling and naive rows).

    .venv/bin/python bench/pipeline_throughput.py            # ~60-90 s on a quiet machine
    .venv/bin/python bench/pipeline_throughput.py --no-cluster --workers 1 2
    .venv/bin/python bench/pipeline_throughput.py --no-cluster --workers 1 --broker-down

``--trickle RATE`` measures the other end (issue 25): no backlog, one order
appended every 1/RATE s for ``--seconds`` (one node), as a fleet's orders
arrive at low rates, so that every batch holds one or two orders and the
per-batch and per-loop costs show. It prints, for ``--workers`` worker
processes, the workers' and Redis's CPU per order and Redis's round trips
(read events), XREADGROUPs and script calls per order, first over the same
time idle (no orders) and then under the trickle:

    .venv/bin/python bench/pipeline_throughput.py --trickle 60 --seconds 20 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from pipeline.catalog import Catalog, CatalogItem, store_catalog
from pipeline.names import CATALOG_KEY
from schemas import Item, Order, Status, decode_order, encode
from schemas.names import DEFAULT_SHARDS, PIPELINE_GROUP, shard_of, status_topic, stream_key
from servicekit.clock import now_ms
from servicekit.mqtt import MqttClient
from servicekit.urls import MqttUrl
from testrig.errors import ServerError
from testrig.procstat import process_cpu_s
from testrig.servers import MosquittoProcess, RedisProcess, find_binary, free_port, port_is_open

CEILING_GROUP = "ceiling"
ROUND_TRIPS = "(round trips)"  # not a command: INFO stats total_reads_processed
NAIVE_GROUP = "naive"
NAIVE_STOCK = "naive:stock"
Client = Any  # aioredis.Redis or RedisCluster: the bench calls what both have


@dataclass
class Row:
    """One measured scenario."""

    backend: str
    name: str
    orders: int
    seconds: float
    redis_cpu_s: float
    consumer_cpu_s: float
    commands: dict[str, tuple[float, float]] = field(default_factory=dict)  # name: (calls, µs)

    @property
    def rate(self) -> float:
        """Orders per second."""
        return self.orders / max(self.seconds, 1e-9)

    @property
    def redis_us(self) -> float:
        """Redis CPU µs per order."""
        return self.redis_cpu_s / self.orders * 1e6

    @property
    def consumer_us(self) -> float:
        """Consumer (worker) CPU µs per order."""
        return self.consumer_cpu_s / self.orders * 1e6


@dataclass
class Backend:
    """A Redis to run scenarios on: a single node or a cluster."""

    name: str
    url: str
    cluster: bool
    nodes: list[int]  # ports, for INFO cpu of each

    def client(self) -> Client:
        """A fresh async client."""
        if self.cluster:
            return RedisCluster.from_url(self.url)
        return aioredis.Redis.from_url(self.url)

    async def cpu_s(self) -> float:
        """Σ used_cpu_sys + used_cpu_user over every node."""
        total = 0.0
        for port in self.nodes:
            async with aioredis.Redis(port=port) as node:
                info: Any = await node.info("cpu")
                total += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
        return total

    async def command_stats(self) -> dict[str, tuple[float, float]]:
        """Σ ``INFO commandstats`` over every node: command name → (calls, usec)."""
        total: dict[str, tuple[float, float]] = {}
        for port in self.nodes:
            async with aioredis.Redis(port=port) as node:
                stats: Any = await node.info("commandstats")
                reads: Any = (await node.info("stats"))["total_reads_processed"]
            calls, _usec = total.get(ROUND_TRIPS, (0.0, 0.0))
            total[ROUND_TRIPS] = (calls + float(reads), 0.0)
            for key, row in stats.items():
                name = key.removeprefix("cmdstat_")
                calls, usec = total.get(name, (0.0, 0.0))
                total[name] = (calls + float(row["calls"]), usec + float(row["usec"]))
        return total

    async def flush(self) -> None:
        """Empty every node."""
        for port in self.nodes:
            async with aioredis.Redis(port=port) as node:
                await node.flushall()


def stats_delta(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, tuple[float, float]]:
    """What ran between two :meth:`Backend.command_stats`: name → (calls, usec)."""
    out = {}
    for name, (calls, usec) in after.items():
        calls0, usec0 = before.get(name, (0.0, 0.0))
        if calls > calls0:
            out[name] = (calls - calls0, usec - usec0)
    return out


def make_orders(count: int, devices: int) -> list[Order]:
    """``count`` one-line orders spread over ``devices`` devices."""
    now = now_ms()
    return [
        Order(v=1, order_id=uuid.uuid4().hex, device_id=f"bench-{i % devices}",
              seq=i // devices, created_at=now, currency="EUR",
              items=(Item("COLA-33", 1, 150),), total=150)
        for i in range(count)
    ]  # fmt: skip


async def prepare(client: Client, shards: int, groups: Sequence[str]) -> None:
    """Catalog (pipeline and naive stock) and the consumer groups on every shard stream."""
    catalog = Catalog(items={"COLA-33": CatalogItem(price=150, stock=10**9)}, currency="EUR")
    await store_catalog(client, catalog, shards=shards)
    await client.hset(NAIVE_STOCK, "COLA-33", 10**9)
    for shard in range(shards):
        for group in groups:
            await client.xgroup_create(stream_key(shard), group, id="0", mkstream=True)


async def append(client: Client, orders: Sequence[Order], shards: int) -> None:
    """XADD the orders to their shard streams with the bridge's fields (pipelined)."""
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


async def read_group(
    client: Client, group: str, consumer: str, streams: Sequence[str], count: int
) -> list[tuple[str, str, dict[bytes, bytes]]]:
    """XREADGROUP new entries of ``streams`` (one command per stream on a cluster)."""
    if isinstance(client, RedisCluster):
        replies = await asyncio.gather(*(
            client.execute_command("XREADGROUP", "GROUP", group, consumer, "COUNT", count,
                                   "STREAMS", stream, ">",
                                   target_nodes=client.get_node_from_key(stream))
            for stream in streams
        ))  # fmt: skip
        rows = [row for reply in replies for row in reply or []]
    else:
        rows = await client.xreadgroup(group, consumer, dict.fromkeys(streams, ">"), count=count)
    return [
        (stream.decode(), entry_id.decode(), fields)
        for stream, entries in rows or []
        for entry_id, fields in entries
    ]


async def ceiling(client: Client, total: int, shards: int, batch: int) -> int:
    """XREADGROUP + XACK every entry, nothing else; returns entries handled."""
    streams = [stream_key(s) for s in range(shards)]
    done = 0
    while done < total:
        rows = await read_group(client, CEILING_GROUP, "c1", streams, batch)
        by_stream: dict[str, list[str]] = {}
        for stream, entry_id, _fields in rows:
            by_stream.setdefault(stream, []).append(entry_id)
        async with client.pipeline(transaction=False) as pipe:
            for stream, ids in by_stream.items():
                pipe.xack(stream, CEILING_GROUP, *ids)
            await pipe.execute()
        done += len(rows)
    return done


async def naive(client: Client, mqtt: MqttClient, total: int, shards: int) -> int:
    """The first way anyone writes it: every order on its own, every step its own command."""
    done = 0
    shard = 0
    while done < total:
        stream = stream_key(shard)
        shard = (shard + 1) % shards
        rows = await read_group(client, NAIVE_GROUP, "n1", [stream], 1)
        for stream_name, entry_id, fields in rows:
            await naive_order(client, mqtt, decode_order(fields[b"payload"]))
            await client.xack(stream_name, NAIVE_GROUP, entry_id)
            done += 1
    return done


async def naive_order(client: Client, mqtt: MqttClient, order: Order) -> None:
    """One order, one command at a time (idempotent through the record's existence)."""
    key = f"naive:order:{order.device_id}:{order.order_id}"
    if await client.exists(key):
        return
    statuses = ["received", "validated"]
    for item in order.items:
        if int(await client.hget(CATALOG_KEY, item.sku) or -1) != item.unit_price:
            statuses.append("rejected")
            break
    else:
        for item in order.items:
            if await client.hincrby(NAIVE_STOCK, item.sku, -item.qty) < 0:
                await client.hincrby(NAIVE_STOCK, item.sku, item.qty)
                statuses.append("rejected")
                break
        else:
            statuses += ["reserved", "confirmed", "fulfilled"]
    await client.hset(key, mapping={"device_id": order.device_id, "payload": encode(order)})
    for status in statuses:
        await client.hset(key, "status", status)
        await client.rpush(key + ":history", status)
        await client.xadd("naive:events", {"order_id": order.order_id, "status": status})
    for status in statuses[2:]:
        if status in {"confirmed", "fulfilled", "rejected"}:
            message = Status(v=1, order_id=order.order_id, status=status,  # type: ignore[arg-type]
                             reason=None, at=now_ms())  # fmt: skip
            await mqtt.publish_acked(status_topic(order.device_id), encode(message))


async def all_acked(client: Client, shards: int) -> bool:
    """Every entry of every shard delivered to the pipeline group and acked."""
    for shard in range(shards):
        for group in await client.xinfo_groups(stream_key(shard)):
            if group["name"] == PIPELINE_GROUP.encode() and (group["lag"] or group["pending"]):
                return False
    return True


async def idle(procs: Sequence[subprocess.Popen[bytes]], log: Path) -> None:
    """Wait until every worker has started and idles (under 20 % of a core for 0.5 s).

    A worker blocked in XREADGROUP on empty streams is not yet a consumer of
    the group, so its start is seen in its CPU time instead.
    """
    deadline = time.monotonic() + 60
    before = [process_cpu_s(p.pid, children=False) for p in procs]
    while True:
        await asyncio.sleep(0.5)
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            raise RuntimeError(f"a worker did not start; see {log}")
        now = [process_cpu_s(p.pid, children=False) for p in procs]
        if all(b - a < 0.1 for a, b in zip(before, now, strict=True)):
            return
        before = now


def worker_env(backend: Backend, mqtt_url: str, shards: int, batch: int) -> dict[str, str]:
    """The workers' environment: this one without ``ORDERS_*``, then the bench's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERS_")}
    env.update({
        "ORDERS_REDIS_URL": backend.url, "ORDERS_REDIS_CLUSTER": str(backend.cluster).lower(),
        "ORDERS_MQTT_URL": mqtt_url, "ORDERS_SHARDS": str(shards),
        "ORDERS_BATCH_SIZE": str(batch), "ORDERS_GATEWAY_LATENCY_MS": "0",
        "ORDERS_LOG_LEVEL": "warning",
    })  # fmt: skip
    return env


@contextlib.contextmanager
def workers(count: int, env: dict[str, str], log: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` worker processes, terminated on exit."""
    procs = []
    with log.open("ab") as out:
        for _ in range(count):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "worker"], env=env, stdout=out, stderr=out
            ))  # fmt: skip
    try:
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


async def pipeline_row(
    backend: Backend, orders: Sequence[Order], count: int, env: dict[str, str], log: Path,
    *, shards: int, append_cpu_s: float, name: str = "",
) -> Row:  # fmt: skip
    """The orders through ``count`` worker processes, once they idle on empty streams."""
    client = backend.client()
    try:
        await backend.flush()
        await prepare(client, shards, [PIPELINE_GROUP])
        with workers(count, env, log) as procs:
            await idle(procs, log)
            cpu0 = sum(process_cpu_s(p.pid, children=False) for p in procs)
            redis0 = await backend.cpu_s()
            stats0 = await backend.command_stats()
            started = time.perf_counter()
            await append(client, orders, shards)
            while not await all_acked(client, shards):
                if any(p.poll() is not None for p in procs):
                    raise RuntimeError(f"a worker exited; see {log}")
                await asyncio.sleep(0.02)
            seconds = time.perf_counter() - started
            redis_s = await backend.cpu_s() - redis0 - append_cpu_s
            cpu_s = sum(process_cpu_s(p.pid, children=False) for p in procs) - cpu0
            commands = stats_delta(stats0, await backend.command_stats())
    finally:
        await client.aclose()
    return Row(backend.name, name or f"pipeline, {count} worker process(es)", len(orders),
               seconds, redis_s, cpu_s, commands)  # fmt: skip


async def in_process_row(
    backend: Backend, name: str, orders: Sequence[Order], group: str, *, shards: int,
    run: Callable[[Client], Awaitable[int]],
) -> tuple[Row, float]:  # fmt: skip
    """A consumer in this process over pre-appended orders; also returns the append's Redis CPU."""
    client = backend.client()
    try:
        await backend.flush()
        await prepare(client, shards, [group])
        redis0 = await backend.cpu_s()
        await append(client, orders, shards)
        append_cpu_s = await backend.cpu_s() - redis0
        redis0 = await backend.cpu_s()
        cpu0 = time.process_time()
        started = time.perf_counter()
        done = await run(client)
        seconds = time.perf_counter() - started
        row = Row(backend.name, name, done, seconds, await backend.cpu_s() - redis0,
                  time.process_time() - cpu0)  # fmt: skip
    finally:
        await client.aclose()
    return row, append_cpu_s


async def scenarios(
    backend: Backend, args: argparse.Namespace, broker: MosquittoProcess, log: Path
) -> list[Row]:
    """Ceiling, naive and the pipeline rows on one backend."""
    shards = args.shards
    orders = make_orders(args.orders, args.devices)
    rows = []
    ceiling_row, append_cpu_s = await in_process_row(
        backend, "ceiling (read+ack, no work)", orders, CEILING_GROUP, shards=shards,
        run=lambda c: ceiling(c, len(orders), shards, args.batch),
    )  # fmt: skip
    rows.append(ceiling_row)
    async with MqttClient(MqttUrl.parse(broker.url), client_id=f"naive-{uuid.uuid4().hex[:8]}",
                          name="naive") as mqtt:  # fmt: skip
        await mqtt.wait_connected()
        naive_orders = orders[: args.naive_orders]
        naive_row, _ = await in_process_row(
            backend, "naive (per-order commands)", naive_orders, NAIVE_GROUP, shards=shards,
            run=lambda c: naive(c, mqtt, len(naive_orders), shards),
        )  # fmt: skip
        rows.append(naive_row)
    env = worker_env(backend, broker.url, shards, args.batch)
    per_order_append = append_cpu_s / len(orders)
    for count in args.workers:
        rows.append(await pipeline_row(
            backend, orders, count, env, log, shards=shards,
            append_cpu_s=per_order_append * len(orders),
        ))  # fmt: skip
    if args.broker_down:
        # Nothing listens on the port: the worker's statuses wait in its backlog.
        down = f"mqtt://127.0.0.1:{free_port()}"
        rows.append(await pipeline_row(
            backend, orders, 1, {**env, "ORDERS_MQTT_URL": down}, log, shards=shards,
            append_cpu_s=per_order_append * len(orders), name="pipeline, 1 worker, broker down",
        ))  # fmt: skip
    return rows


@contextlib.contextmanager
def cluster_backend(workdir: Path) -> Iterator[Backend]:
    """A 3-master Redis Cluster on loopback (ports whose bus port, +10000, is free too)."""
    nodes: list[RedisProcess] = []
    try:
        while len(nodes) < 3:
            port = free_port()
            if port > 55535 or port_is_open(port + 10000):
                continue
            node = RedisProcess(workdir / str(port), port, extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
            ))  # fmt: skip
            try:
                node.start()
            except ServerError:  # the port or its bus port was taken meanwhile: another
                node.kill()
                continue
            nodes.append(node)
        ports = [node.port for node in nodes]
        subprocess.run(
            [find_binary("redis-cli"), "--cluster", "create", "--cluster-yes",
             *[f"127.0.0.1:{port}" for port in ports]],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not all(b"cluster_state:ok" in _cluster_info(port) for port in ports):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not come up")
            time.sleep(0.1)
        yield Backend("3 masters", f"redis://127.0.0.1:{ports[0]}/0", True, ports)
    finally:
        for node in nodes:
            node.kill()


def _cluster_info(port: int) -> bytes:
    done = subprocess.run([find_binary("redis-cli"), "-p", str(port), "cluster", "info"],
                          capture_output=True, timeout=10, check=False)  # fmt: skip
    return done.stdout


def print_table(rows: Sequence[Row], args: argparse.Namespace) -> None:
    """The rows with their ratios to the same backend's ceiling and naive rows."""
    print(f"orders={args.orders} (naive {args.naive_orders}) devices={args.devices} "
          f"shards={args.shards} batch={args.batch} cores={os.cpu_count()}")  # fmt: skip
    head = (f"{'redis':10} {'scenario':34} {'orders/s':>9} {'vs ceiling':>10} {'vs naive':>9} "
            f"{'redis µs/order':>14} {'worker µs/order':>15}")  # fmt: skip
    print(head)
    for row in rows:
        base = next(r for r in rows if r.backend == row.backend and r.name.startswith("ceiling"))
        slow = next(r for r in rows if r.backend == row.backend and r.name.startswith("naive"))
        ratios = f"{row.rate / base.rate:10.1%} {row.rate / slow.rate:8.1f}x"
        print(f"{row.backend:10} {row.name:34} {row.rate:9.0f} {ratios} "
              f"{row.redis_us:14.1f} {row.consumer_us:15.1f}")  # fmt: skip
    for row in rows:
        if row.commands:
            print(f"{row.backend:10} {row.name:34} Redis per order: "
                  + command_line(row.commands, row.orders))  # fmt: skip
    print_goals(rows)


# The bench's own commands besides its appends (acked-yet polls, INFO, group setup).
BENCH_COMMANDS = frozenset({"xinfo|groups", "info", "xgroup|create", "flushall"})
# Commands the pipeline's scripts run: Redis counts them under their own names
# too, and their µs are also inside the script call's (evalsha) µs.
IN_SCRIPTS = frozenset({"hmget", "hget", "hset", "hincrby", "zadd", "sadd", "pexpire",
                        "hgetall", "xadd"})  # fmt: skip


def command_line(commands: dict[str, tuple[float, float]], orders: int) -> str:
    """Calls × µs (inside Redis) per order of each command, costliest first.

    ``*``: also run inside scripts, so part or all of its µs is inside ``evalsha``'s
    (``xadd`` holds the bench's own appends, one per order, and the events entries).
    """
    rows = sorted(
        ((k, c, u) for k, (c, u) in commands.items() if k not in BENCH_COMMANDS),
        key=lambda row: -row[2],
    )
    trips = commands.get(ROUND_TRIPS, (0.0, 0.0))[0] / orders
    return f"round trips {trips:.2f}; " + ", ".join(
        f"{k}{'*' if k in IN_SCRIPTS else ''} {c / orders:.2f}×{u / orders:.1f}µs"
        for k, c, u in rows
        if k != ROUND_TRIPS and (u / orders >= 0.05 or c / orders >= 0.01)
    )


def print_goals(rows: Sequence[Row]) -> None:
    """The pipeline's goals on its best rows, met or not (issue 25: printed every run)."""
    ours = [r for r in rows if not r.name.startswith(("ceiling", "naive"))]
    if not ours:
        return
    share = max(ours, key=lambda r: r.rate / _ceiling(rows, r).rate)
    redis_best = min(ours, key=lambda r: r.redis_us)
    worker_best = min(ours, key=lambda r: r.consumer_us)
    goals = [
        (f"best row {share.rate / _ceiling(rows, share).rate:.1%} of the read+ack ceiling "
         f"({share.backend}, {share.name.strip()})", "≥ 50 %",
         share.rate / _ceiling(rows, share).rate >= 0.5),
        (f"Redis {redis_best.redis_us:.1f} µs per order at best ({redis_best.backend}, "
         f"{redis_best.name.strip()})", "≤ 25 µs", redis_best.redis_us <= 25),
        (f"worker {worker_best.consumer_us:.1f} µs per order at best ({worker_best.backend}, "
         f"{worker_best.name.strip()})", "≤ 60 µs", worker_best.consumer_us <= 60),
    ]  # fmt: skip
    for what, goal, met in goals:
        print(f"goal: {what} [goal {goal}: {'met' if met else 'NOT MET'}]")


def _ceiling(rows: Sequence[Row], row: Row) -> Row:
    return next(r for r in rows if r.backend == row.backend and r.name.startswith("ceiling"))


async def run(args: argparse.Namespace) -> None:
    """Every backend's scenarios, then the table."""
    rows: list[Row] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp,
        RedisProcess(Path(tmp) / "redis") as single,
        MosquittoProcess(Path(tmp) / "mosquitto") as broker,
    ):
        log = Path(tmp) / "workers.log"
        backend = Backend("1 node", single.url, False, [single.port])
        rows += await scenarios(backend, args, broker, log)
        if not args.no_cluster:
            with cluster_backend(Path(tmp) / "cluster") as cluster:
                rows += await scenarios(cluster, args, broker, log)
    print_table(rows, args)


async def redis_counts(client: Client) -> dict[str, float]:
    """Redis's read events (≈ round trips) and calls of the commands a worker batch makes."""
    stats: Any = await client.info("stats")
    commands: Any = await client.info("commandstats")
    counts = {"round trips": float(stats["total_reads_processed"])}
    for name in ("xreadgroup", "evalsha", "xack", "xautoclaim", "hmget"):
        counts[name] = float(commands.get(f"cmdstat_{name}", {}).get("calls", 0))
    return counts


async def trickle_window(
    backend: Backend, client: Client, procs: Sequence[subprocess.Popen[bytes]],
    orders: Sequence[Order], *, seconds: float, shards: int,
) -> tuple[float, float, dict[str, float], dict[str, tuple[float, float]]]:  # fmt: skip
    """Workers' and Redis's CPU s, Redis's counts and commandstats over ``seconds``,
    ``orders`` paced over it."""
    cpu0 = sum(process_cpu_s(p.pid, children=False) for p in procs)
    redis0 = await backend.cpu_s()
    counts0 = await redis_counts(client)
    stats0 = await backend.command_stats()
    started = time.monotonic()
    for i, order in enumerate(orders):
        await asyncio.sleep(max(0.0, started + i * seconds / len(orders) - time.monotonic()))
        await append(client, [order], shards)
    await asyncio.sleep(max(0.0, started + seconds - time.monotonic()))
    while orders and not await all_acked(client, shards):  # noqa: ASYNC110 (polls Redis)
        await asyncio.sleep(0.05)
    counts1 = await redis_counts(client)
    return (
        sum(process_cpu_s(p.pid, children=False) for p in procs) - cpu0,
        await backend.cpu_s() - redis0,
        {k: counts1[k] - counts0[k] for k in counts1},
        stats_delta(stats0, await backend.command_stats()),
    )


async def trickle(args: argparse.Namespace) -> None:
    """Idle, then ``--trickle`` orders/s for ``--seconds``: CPU and round trips per order."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp,
        RedisProcess(Path(tmp) / "redis") as single,
        MosquittoProcess(Path(tmp) / "mosquitto") as broker,
    ):
        log = Path(tmp) / "workers.log"
        backend = Backend("1 node", single.url, False, [single.port])
        env = worker_env(backend, broker.url, args.shards, args.batch)
        client = backend.client()
        count = args.workers[0]
        orders = make_orders(round(args.trickle * args.seconds), args.devices)
        try:
            await prepare(client, args.shards, [PIPELINE_GROUP])
            with workers(count, env, log) as procs:
                await idle(procs, log)
                # On a loaded machine a worker still importing can look idle: wait
                # until each has made its first loop turn (its reclaim, one per shard).
                while (await redis_counts(client))["xautoclaim"] < args.shards * count:  # noqa: ASYNC110
                    await asyncio.sleep(0.2)
                await asyncio.sleep(1.0)
                idle_cpu, idle_redis, idle_counts, _ = await trickle_window(
                    backend, client, procs, [], seconds=args.seconds, shards=args.shards
                )
                cpu, redis_s, counts, commands = await trickle_window(
                    backend, client, procs, orders, seconds=args.seconds, shards=args.shards
                )
        finally:
            await client.aclose()
    n = len(orders)
    print(f"trickle: {args.trickle:g} orders/s for {args.seconds:g} s ({n} orders), "
          f"{count} worker process(es), shards={args.shards}, load average "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"  idle, per second: workers {idle_cpu / args.seconds * 1e3:.2f} ms CPU, Redis "
          f"{idle_redis / args.seconds * 1e3:.2f} ms; "
          + ", ".join(f"{k} {v / args.seconds:.1f}" for k, v in idle_counts.items()))  # fmt: skip
    print(f"  trickle, per order: workers {cpu / n * 1e6:.0f} µs, Redis {redis_s / n * 1e6:.0f} µs "
          "(its appends included); "
          + ", ".join(f"{k} {v / n:.2f}" for k, v in counts.items()))  # fmt: skip
    print("  trickle, Redis per order (calls × µs inside Redis, * = also inside scripts): "
          + command_line(commands, n))  # fmt: skip


def main() -> None:
    """Parse flags and run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--orders", type=int, default=10_000)
    parser.add_argument("--naive-orders", type=int, default=500)
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--shards", type=int, default=DEFAULT_SHARDS)
    parser.add_argument("--batch", type=int, default=100, help="XREADGROUP COUNT per shard")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--no-cluster", action="store_true", help="skip the 3-master rows")
    parser.add_argument(
        "--broker-down", action="store_true", help="add a 1-worker row with no broker listening"
    )
    parser.add_argument(
        "--trickle",
        type=float,
        default=0.0,
        help="orders/s appended one at a time (no backlog): the low-rate mode",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="--trickle: seconds of load")
    args = parser.parse_args()
    asyncio.run(trickle(args) if args.trickle else run(args))


if __name__ == "__main__":
    main()
