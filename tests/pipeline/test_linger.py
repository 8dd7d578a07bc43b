"""The worker's batch linger (issue 25): a busy worker waits ``batch_linger_ms`` before its
next read after a small batch, so batches carry more orders; an idle one never waits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from pipeline._lua import Scripts
from pipeline.config import PipelineConfig
from pipeline.metrics import WorkerMetrics
from pipeline.records import StreamEntry
from pipeline.steps import StepDeps, build_chain
from pipeline.worker import Settled, Worker
from schemas import Status
from tests.helpers import make_order, wait_until

from .conftest import TEST_SHARDS
from .producer import produce

# Long against any loaded machine's round trips, so the tests do not race it.
LINGER_MS = 1000.0


class Sender:
    """The worker's StatusSender seam: notes when each batch's statuses came, calls ``then``."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self.then: list[Any] = []  # coroutine functions, one per send call, run as tasks
        self.tasks: list[asyncio.Task[Any]] = []

    def send(self, messages: Sequence[tuple[str, Status]]) -> int:
        self.calls.append(time.monotonic())
        if len(self.calls) <= len(self.then):
            self.tasks.append(asyncio.create_task(self.then[len(self.calls) - 1]()))
        return len(messages)


class Sizing(Worker):
    """A worker that notes the size of every batch it settles, and the lingers before it."""

    sizes: list[tuple[int, int]]

    async def settle(self, entries: Sequence[StreamEntry]) -> Settled:
        self.sizes.append((len(entries), self.lingers))
        return await super().settle(entries)


@pytest.fixture
async def running(aredis: Any, config: PipelineConfig) -> AsyncIterator[Any]:
    """Start a Sizing worker with overrides; stopped after the test."""
    started: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    def start(sender: Sender, **overrides: Any) -> Sizing:
        cfg = msgspec.structs.replace(config, consumer="linger", **overrides)
        scripts = Scripts()
        chain = build_chain(cfg.steps, StepDeps(aredis, scripts, cfg))
        worker = Sizing(aredis, sender, chain, cfg, WorkerMetrics(CollectorRegistry()),
                        scripts=scripts)  # fmt: skip
        worker.sizes = []
        stop = asyncio.Event()
        started.append((stop, asyncio.create_task(worker.run(stop))))
        return worker

    yield start
    for stop, task in started:
        stop.set()
        await asyncio.wait_for(task, 10)


@pytest.mark.usefixtures("catalog")
async def test_a_busy_worker_lingers_and_its_next_batch_carries_the_burst(
    aredis: Any, running: Any
) -> None:
    """Batch 1 wakes the worker from idle (no linger); batch 2's order was waiting or came at
    once (busy: linger); a burst of 10 that lands during the linger is one batch."""
    sender = Sender()

    async def second() -> None:
        await produce(aredis, make_order("dev-linger-b", 0), TEST_SHARDS)

    async def burst() -> None:
        async with aredis.pipeline(transaction=False) as pipe:
            for i in range(10):
                await produce(pipe, make_order(f"dev-linger-c{i}", 0), TEST_SHARDS)
            await pipe.execute()

    sender.then = [second, burst]
    await produce(aredis, make_order("dev-linger-a", 0), TEST_SHARDS)
    # Long blocks: an empty read between the batches would count as idle.
    worker = running(sender, batch_linger_ms=LINGER_MS, block_ms=10_000)
    await wait_until(lambda: sum(n for n, _ in worker.sizes) == 12, what="12 orders settled",
                     explain=lambda: worker.sizes)  # fmt: skip
    # (size, lingers before it): none after batch 1 (from idle), one after batch 2.
    assert worker.sizes == [(1, 0), (1, 0), (10, 1)]


@pytest.mark.usefixtures("catalog")
async def test_an_idle_worker_answers_a_lone_order_without_lingering(
    aredis: Any, running: Any
) -> None:
    """A worker whose reads came back empty settles the next order at once."""
    sender = Sender()
    worker = running(sender, batch_linger_ms=LINGER_MS)  # the suite's block_ms: 50
    await wait_until(lambda: worker._reading, what="the worker reading")
    await asyncio.sleep(0.2)  # a few empty reads (block_ms 50)
    produced = time.monotonic()
    await produce(aredis, make_order("dev-lone", 0), TEST_SHARDS)
    await wait_until(lambda: bool(sender.calls), what="the lone order's statuses")
    waited = sender.calls[0] - produced
    await wait_until(lambda: worker._reading, what="the worker reading again")
    assert worker.sizes == [(1, 0)]
    assert worker.lingers == 0
    assert waited < LINGER_MS / 1000 / 2  # generous: a linger would be all of LINGER_MS
