"""Worker processes SIGKILLed mid-batch and restarted, or SIGTERMed: nothing lost or doubled."""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from pipeline import order_statuses
from pipeline._lua import Scripts
from pipeline.config import PipelineConfig
from pipeline.names import PIPELINE_DLQ_STREAM, TERMINAL_STATUSES, order_key, transfers_key
from pipeline.records import load_order, read_events
from pipeline.stock import settle_transfers, stock_levels
from schemas import Order
from schemas.names import PIPELINE_GROUP, stream_key
from tests.helpers import make_order, wait_until

from .api_client import api_client
from .conftest import INITIAL_STOCK, StatusListener
from .processes import env_for, sigkill, spawn, stop_all
from .producer import produce

SEED = 20261122


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Worker processes of this test; any left running are killed afterwards."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    stop_all(started)


def consumer_of(process: subprocess.Popen[bytes]) -> str:
    """The consumer name a worker process uses by default."""
    return f"{socket.gethostname()}-{process.pid}"


async def pending_of(client: aioredis.Redis, consumer: str, shards: int) -> int:
    """Entries delivered to ``consumer`` and not acked, over all shards."""
    total = 0
    for shard in range(shards):
        try:
            rows = await client.xinfo_consumers(stream_key(shard), PIPELINE_GROUP)
        except ResponseError:  # the worker has not created the group yet
            continue
        for row in rows:
            if row["name"].decode() == consumer:
                total += int(row["pending"])
    return total


async def statuses(client: Any, orders: list[Order], shards: int) -> list[str]:
    """The stored status of each order."""
    found = await order_statuses(client, [(o.device_id, o.order_id) for o in orders], shards=shards)
    return [s or "" for s in found]


async def assert_books_balance(client: Any, orders: list[Order], shards: int) -> None:
    """One terminal state per order; final stock = initial − Σ qty of confirmed/fulfilled orders.

    Stock counts every shard's part and any transfer between shards still in flight.
    """
    sold: Counter[str] = Counter()
    for order in orders:
        record = await load_order(client, order.device_id, order.order_id, shards=shards)
        assert record is not None
        terminal = [h["status"] for h in record["history"] if h["status"] in TERMINAL_STATUSES]
        assert terminal == [record["status"]], (order.order_id, record["history"])
        held = await client.hget(order_key(order.device_id, order.order_id, shards), "res")
        if record["status"] in {"confirmed", "fulfilled"}:
            assert held == b"held"
            for item in order.items:
                sold[item.sku] += item.qty
        else:
            assert held in {None, b"released"}
    levels = await stock_levels(client, shards, INITIAL_STOCK)
    for sku, initial in INITIAL_STOCK.items():
        assert levels[sku] >= 0
        assert levels[sku] == initial - sold[sku], sku
    events = Counter(
        [
            fields["order_id"]
            async for fields in read_events(client, shards)
            if fields["status"] in TERMINAL_STATUSES
        ]
    )
    assert all(events[o.order_id] == 1 for o in orders)


async def transfers_in_flight(client: Any, shards: int) -> int:
    """Stock transfers between shards logged and not completed."""
    return sum([await client.zcard(transfers_key(shard)) for shard in range(shards)])


def random_orders(count: int, devices: int) -> list[Order]:
    """Seeded orders over a few devices, some for the scarce SKU."""
    rng = random.Random(SEED)
    seqs: Counter[int] = Counter()
    orders = []
    for _ in range(count):
        device = rng.randrange(devices)
        sku, price = rng.choice([("COLA-33", 150), ("WATER-50", 100), ("RARE-1", 999)])
        orders.append(
            make_order(f"crash-{device}", seqs[device], [(sku, rng.randint(1, 3), price)])
        )
        seqs[device] += 1
    return orders


# The cluster run is shorter (the default suite's time budget); both kill workers
# holding entries, restart them, and check every order and every unit of stock.
CRASH_RUNS = [("single", (480, 3)), ("cluster", (200, 2))]  # (orders, kills)


@pytest.mark.usefixtures("catalog")
@pytest.mark.parametrize(
    ("backend", "size"), CRASH_RUNS, indirect=["backend"], ids=["single", "cluster"]
)
async def test_sigkilled_workers_lose_nothing_and_reserve_nothing_twice(
    aredis: Any,
    *,
    config: PipelineConfig,
    processes: list[subprocess.Popen[bytes]],
    status_listener: StatusListener,
    tmp_path: Path,
    size: tuple[int, int],
) -> None:
    """Two workers SIGKILLed mid-batch (3 times; twice on the cluster), restarted: each order
    ends once, stock adds up (over shards and transfers), the API reads every order."""
    env = env_for(
        config,
        batch_size=4,
        claim_idle_ms=500,
        claim_every_ms=200,
        max_deliveries=50,  # kills must not push orders into the DLQ
        gateway_latency_ms=60,
        gateway_failure_rate=0.1,
        gateway_decline_rate=0.1,
        gateway_seed=SEED,
        payment_backoff_ms=5,
        log_level="warning",
    )
    count, kills = size
    orders = random_orders(count, devices=12)
    for device in {o.device_id for o in orders}:
        status_listener.subscribe(device)
    for order in orders:
        await produce(aredis, order, config.shards)
    log = tmp_path / "workers.log"
    processes += [spawn(["worker"], env, log) for _ in range(2)]
    victims: list[subprocess.Popen[bytes]] = []

    async def holds_entries() -> bool:
        # Kill only a worker that holds unacked entries: that is "mid-batch".
        victims[:] = [
            p for p in processes
            if p.poll() is None and await pending_of(aredis, consumer_of(p), config.shards)
        ]  # fmt: skip
        return bool(victims)

    killed = 0
    while killed < kills:
        await wait_until(holds_entries, what="a worker holding entries", timeout_s=30)
        victim = victims[0]
        sigkill(victim)
        killed += 1
        assert await pending_of(aredis, consumer_of(victim), config.shards) > 0
        processes.remove(victim)
        processes.append(spawn(["worker"], env, log))

    async def all_terminal() -> bool:
        return all(s in TERMINAL_STATUSES for s in await statuses(aredis, orders, config.shards))

    await wait_until(all_terminal, what="every order terminal", timeout_s=120)

    async def all_acked() -> bool:
        pending = [
            await aredis.xpending(stream_key(s), PIPELINE_GROUP) for s in range(config.shards)
        ]
        return all(p["pending"] == 0 for p in pending)

    await wait_until(all_acked, what="every entry acked", timeout_s=30)
    await settle_transfers(aredis, Scripts(), shards=config.shards, older_than_ms=0)
    assert await transfers_in_flight(aredis, config.shards) == 0
    await assert_books_balance(aredis, orders, config.shards)
    async with api_client(aredis, config.shards) as http:
        for order in orders[:: len(orders) // 20]:
            response = await http.get(f"/v1/devices/{order.device_id}/orders/{order.order_id}")
            assert response.status == 200
            assert (await response.json())["status"] in TERMINAL_STATUSES
        page = await (await http.get(f"/v1/devices/{orders[0].device_id}/orders")).json()
        assert page["items"]
    assert await aredis.xlen(PIPELINE_DLQ_STREAM) == 0
    outcomes = Counter(await statuses(aredis, orders, config.shards))
    # The seeded mix really exercised every ending.
    final = dict(
        zip(
            (o.order_id for o in orders), await statuses(aredis, orders, config.shards), strict=True
        )
    )

    async def every_status_heard() -> bool:
        # At least once, in spite of the kills: the final status, and `confirmed`
        # before `fulfilled` (a reclaimed entry re-publishes its stored history).
        for order_id, status in final.items():
            heard = status_listener.statuses(order_id)
            if status not in heard:
                return False
            if status == "fulfilled" and "confirmed" not in heard[: heard.index("fulfilled")]:
                return False
        return True

    await wait_until(every_status_heard, what="every status on the devices' topics")
    assert outcomes["fulfilled"] > 0, outcomes
    assert outcomes["rejected"] > 0, outcomes
    assert outcomes["failed"] > 0, outcomes


@pytest.mark.usefixtures("catalog")
async def test_sigterm_finishes_the_batch_in_hand_and_acks_it(
    aredis: aioredis.Redis,
    config: PipelineConfig,
    processes: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """SIGTERM while payments are in flight: the worker finishes, acks, and exits 0."""
    env = env_for(config, batch_size=50, gateway_latency_ms=400, log_level="info")
    orders = [make_order("term-dev", seq, [("COLA-33", 1, 150)]) for seq in range(6)]
    for order in orders:
        await produce(aredis, order, config.shards)
    worker = spawn(["worker"], env, tmp_path / "worker.log")
    processes.append(worker)

    async def in_hand() -> bool:
        return await pending_of(aredis, consumer_of(worker), config.shards) == len(orders)

    await wait_until(in_hand, what="the batch in hand")
    worker.terminate()
    assert await asyncio.to_thread(worker.wait, 20) == 0
    assert await statuses(aredis, orders, config.shards) == ["fulfilled"] * len(orders)
    assert await pending_of(aredis, consumer_of(worker), config.shards) == 0
    assert b"worker_stopped" in (tmp_path / "worker.log").read_bytes()
