"""A worker's batch reaches one Redis node: its reads, its commit and its XACKs on one connection.

Across a Sentinel failover, pooled connections may reach different masters (one
that froze and resumed, and the new one): a commit on the old master with its
XACK on the new one left an order acked where its outcome never was (make
demo-ha). ``run_worker`` gives the worker a single connection of its own on one
master, while the other loops of the process (health, status queries, layout
watch) share their pool. MONITOR shows which connection sent each command. And
an XACK never outlives a failed round trip: the next one may reach another node.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.exceptions import ConnectionError as RedisConnectionError

from pipeline._lua import Scripts
from pipeline.config import PipelineConfig
from pipeline.metrics import WorkerMetrics
from pipeline.service import redis_client, run_worker
from pipeline.steps import StepDeps, build_chain
from pipeline.worker import Worker
from schemas import Health, encode
from schemas.names import PIPELINE_GROUP, health_topic, stream_key
from servicekit.clock import now_ms
from tests.helpers import make_order, wait_until

from ..fleet.mqtt_probe import Probe
from .conftest import TEST_SHARDS
from .producer import produce

# MONITOR: 1733612345.123456 [0 127.0.0.1:54321] "XACK" "orders:{0}" ...
MONITOR_LINE = re.compile(
    r'[0-9.]+ \[\d+ (?P<addr>[^\]]+)\] "(?P<cmd>[A-Za-z]+)"(?: "(?P<arg>[^"]*)")?.*'
)


async def watch(url: str, lines: list[tuple[str, str, str]], ready: asyncio.Event) -> None:
    """Append (address, command, first argument) for every command Redis runs."""
    client = aioredis.Redis.from_url(url)
    try:
        async with client.monitor() as monitor:
            ready.set()
            while True:
                reply: Any = await monitor.connection.read_response()
                text = reply.decode() if isinstance(reply, bytes) else str(reply)
                if match := MONITOR_LINE.fullmatch(text):
                    lines.append((match["addr"], match["cmd"].upper(), match["arg"] or ""))
    finally:
        await client.aclose()


async def pending_and_lag(client: Any) -> int:
    total = 0
    for shard in range(TEST_SHARDS):
        for group in await client.xinfo_groups(stream_key(shard)):
            if group["name"] in (PIPELINE_GROUP, PIPELINE_GROUP.encode()):
                total += int(group["pending"]) + int(group.get("lag") or 0)
    return total


@pytest.mark.usefixtures("catalog")
async def test_a_workers_reads_commits_and_acks_share_one_connection(
    config: PipelineConfig, aredis: Any, mosquitto: Any
) -> None:
    """Orders trickle in while health reports keep the process's shared pool busy: every
    XREADGROUP, commit script and XACK of the worker came from one client address."""
    cfg = msgspec.structs.replace(config, consumer="one-connection", block_ms=200)
    lines: list[tuple[str, str, str]] = []
    ready = asyncio.Event()
    watcher = asyncio.create_task(watch(cfg.redis_url, lines, ready))
    await ready.wait()
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(cfg, stop))
    try:
        await wait_until(
            lambda: any(cmd == "XREADGROUP" for _, cmd, _ in lines), what="the worker's first read"
        )
        with Probe(mosquitto.port) as probe:
            for n in range(60):
                health = Health(v=1, online=True, at=now_ms(), outbox_depth=n % 3)
                probe.publish(health_topic(f"conn-health-{n}"), encode(health))
                await produce(aredis, make_order(f"conn-dev-{n % 7}", n), TEST_SHARDS)
                await asyncio.sleep(0.02)

        async def all_acked() -> bool:
            return await pending_and_lag(aredis) == 0

        await wait_until(all_acked, 30, "every order processed and acked")
        stopped_at = len(lines)  # a stop cuts the idle read: the flush after it may reconnect
    finally:
        stop.set()
        await asyncio.wait_for(worker, 30)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    commit = Scripts().sha["commit"]
    seen = lines[:stopped_at]
    reads = {addr for addr, cmd, _ in seen if cmd == "XREADGROUP"}
    acks = {addr for addr, cmd, _ in seen if cmd == "XACK"}
    commits = {addr for addr, cmd, arg in seen if cmd == "EVALSHA" and arg == commit}
    others = {addr for addr, cmd, _ in seen if cmd not in {"XREADGROUP", "XACK", "EVALSHA"}}
    assert commits, "no commit script seen"
    assert acks, "no XACK seen"
    assert len(reads | acks | commits) == 1, f"reads {reads}, commits {commits}, acks {acks}"
    # The health consumer and the layout watch wrote and read on connections of their own.
    assert others - reads, f"no other connection in use: {others}"


class NoStatuses:
    """The worker's StatusSender seam: statuses are not what this test is about."""

    def send(self, messages: Any) -> int:
        return len(messages)


@pytest.mark.usefixtures("catalog")
async def test_acks_of_a_failed_round_trip_are_dropped_not_sent_on_the_next(
    config: PipelineConfig, aredis: Any
) -> None:
    """A batch is stored and its acks queued; the round trip that carries them (the next
    read) fails (its connection killed: a demoted or frozen master's); a later round trip
    does not send them, so the entry stays pending, to be reclaimed. Before: they were put
    back and sent on the next connection, which across a failover reaches the new master."""
    cfg = msgspec.structs.replace(config, consumer="drops-acks", block_ms=10)
    client: Any = redis_client(cfg, max_connections=1)  # the worker's, as in run_worker
    try:
        scripts = Scripts()
        chain = build_chain(cfg.steps, StepDeps(client, scripts, cfg))
        worker = Worker(client, NoStatuses(), chain, cfg, WorkerMetrics(CollectorRegistry()),
                        scripts=scripts)  # fmt: skip
        await worker.setup()
        order = make_order("acks-dev", 1)
        await produce(aredis, order, TEST_SHARDS)
        entries = await worker.read()
        assert [e.fields["order_id"] for e in entries] == [order.order_id.encode()]
        await worker.finish(await worker.settle(entries))  # stored; its ack is queued
        killed = await aredis.client_kill_filter(_id=await client.client_id())
        assert killed == 1, "the worker's connection was not killed"
        with pytest.raises(RedisConnectionError):
            await worker.read()  # carries the ack: fails on the killed connection
        await worker.flush_acks()  # a new connection: nothing left to send
        assert await worker.read() == []
        pending = await aredis.xpending(entries[0].stream, PIPELINE_GROUP)
        assert pending["pending"] == 1, "the ack crossed to a new connection"
    finally:
        await client.aclose()
