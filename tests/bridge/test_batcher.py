"""The batcher against a fake OrderSink: batching, retries, and nothing settled before a write."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from bridge.batcher import ACCEPTED, DUPLICATE, Batcher, Outcome
from bridge.errors import ReplicasShortfall, StoreError
from bridge.ingest import DeadLetter, ValidOrder
from bridge.metrics import BridgeMetrics
from bridge.store import AppendResult, RedisState


def order(seq: int, device: str = "d") -> ValidOrder:
    """A ValidOrder without real validation (the fake sink doesn't care)."""
    return ValidOrder(0, device, f"order-{seq:04d}", seq, 1, b"p", f"h{seq}")


class FakeSink:
    """Records batches; fails the first ``failures`` writes; answers by a rule."""

    def __init__(self, failures: int = 0, conflict_seqs: frozenset[int] = frozenset()) -> None:
        self.failures = failures
        self.conflicts = conflict_seqs
        self.calls: list[tuple[list[ValidOrder], list[DeadLetter]]] = []
        self.stored: set[str] = set()
        self.gate = asyncio.Event()
        self.gate.set()

    async def write(
        self, orders: Sequence[ValidOrder], dead: Sequence[DeadLetter], *, trim_shards: set[int]
    ) -> list[AppendResult]:
        await self.gate.wait()
        self.calls.append((list(orders), list(dead)))
        if self.failures > 0:
            self.failures -= 1
            raise StoreError("redis down")
        results = []
        for item in orders:
            if item.seq in self.conflicts:
                results.append(AppendResult.CONFLICT)
            elif item.order_id in self.stored:
                results.append(AppendResult.DUPLICATE)
            else:
                self.stored.add(item.order_id)
                results.append(AppendResult.APPENDED)
        return results

    async def ping(self) -> float:
        return 0.0

    async def confirm_replicas(self) -> None:
        return None

    async def inspect(self) -> RedisState:
        return RedisState(
            aof_enabled=True, appendfsync="always", durable=True, used_memory=0, maxmemory=0
        )


class ShortSink(FakeSink):
    """Stores every write, but the first ``shortfalls`` writes find too few replicas."""

    def __init__(self, shortfalls: int) -> None:
        super().__init__()
        self.shortfalls = shortfalls

    async def write(
        self, orders: Sequence[ValidOrder], dead: Sequence[DeadLetter], *, trim_shards: set[int]
    ) -> list[AppendResult]:
        results = await super().write(orders, dead, trim_shards=trim_shards)
        if self.shortfalls > 0:
            self.shortfalls -= 1
            raise ReplicasShortfall("WAIT: 0 of 1 replicas confirmed the batch", results)
        return results


def make(sink: FakeSink, max_batch: int = 10) -> Batcher:
    """A batcher with test-friendly timings."""
    return Batcher(
        sink,
        BridgeMetrics(),
        max_batch=max_batch,
        max_delay_s=0.001,
        backoff_max_s=0.01,
        trim_every_batches=0,
    )


def submit(batcher: Batcher, item: ValidOrder | DeadLetter) -> asyncio.Future[Outcome]:
    """Add an item; the future resolves when its done callback runs."""
    future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
    batcher.add(item, future.set_result)
    return future


async def test_batches_respect_max_and_answer_each_message() -> None:
    """25 messages go in batches of at most 10; copies are answered duplicate."""
    sink = FakeSink()
    batcher = make(sink)
    async with asyncio.TaskGroup() as tg:
        writer = tg.create_task(batcher.run())
        outcomes = await asyncio.gather(*(submit(batcher, order(i % 20)) for i in range(25)))
        writer.cancel()
    assert all(len(orders) <= 10 for orders, _ in sink.calls)
    assert outcomes.count(ACCEPTED) == 20
    assert outcomes.count(DUPLICATE) == 5
    assert batcher.pending == 0


async def test_nothing_settles_while_redis_fails() -> None:
    """While writes fail, no done callback runs; after recovery all run, none lost."""
    sink = FakeSink(failures=5)
    batcher = make(sink)
    async with asyncio.TaskGroup() as tg:
        writer = tg.create_task(batcher.run())
        pending = [submit(batcher, order(i)) for i in range(3)]
        while len(sink.calls) < 3:  # noqa: ASYNC110 - polling a fake's call log is the point
            await asyncio.sleep(0.001)
        assert not any(future.done() for future in pending)
        assert batcher.pending == 3
        outcomes = [await future for future in pending]
        writer.cancel()
    assert outcomes == [ACCEPTED] * 3
    assert sink.failures == 0


async def test_conflict_goes_to_dlq_before_settling() -> None:
    """A conflict is answered rejected/conflict only after its dead letter was written."""
    sink = FakeSink(conflict_seqs=frozenset({1}))
    batcher = make(sink)
    async with asyncio.TaskGroup() as tg:
        writer = tg.create_task(batcher.run())
        outcome = await submit(batcher, order(1))
        writer.cancel()
    assert outcome == Outcome("rejected", "conflict")
    assert [letter.reason for _, dead in sink.calls for letter in dead] == ["conflict"]


async def test_a_failing_callback_does_not_stop_the_batch() -> None:
    """One message's done callback raising still lets the others settle."""
    sink = FakeSink()
    batcher = make(sink)

    def explode(outcome: Outcome) -> None:
        raise RuntimeError("receipt failed")

    async with asyncio.TaskGroup() as tg:
        writer = tg.create_task(batcher.run())
        batcher.add(order(1), explode)
        later = submit(batcher, order(2))
        assert await later == ACCEPTED
        writer.cancel()
    assert batcher.pending == 0


async def test_drain_waits_for_the_write() -> None:
    """drain() returns only once every added message is written."""
    sink = FakeSink()
    sink.gate.clear()
    batcher = make(sink)
    async with asyncio.TaskGroup() as tg:
        writer = tg.create_task(batcher.run())
        future = submit(batcher, order(1))
        await asyncio.sleep(0.01)
        drain = tg.create_task(batcher.drain())
        await asyncio.sleep(0.01)
        assert not drain.done()
        sink.gate.set()
        await drain
        assert await future == ACCEPTED
        writer.cancel()


async def test_a_lone_message_is_written_at_once_however_long_the_delay() -> None:
    """Idle batcher: a single order goes to Redis without waiting out ``max_delay_s``."""
    sink = FakeSink()
    batcher = Batcher(sink, BridgeMetrics(), max_batch=10, max_delay_s=3600.0,
                      backoff_max_s=0.01, trim_every_batches=0)  # fmt: skip
    async with asyncio.TaskGroup() as tg:
        writer = tg.create_task(batcher.run())
        # An hour's delay: only a write that waits for no timer settles within the bound.
        async with asyncio.timeout(5):
            assert await submit(batcher, order(1)) == ACCEPTED
        writer.cancel()
    assert [len(orders) for orders, _ in sink.calls] == [1]


async def test_messages_arriving_during_a_write_form_the_next_batch() -> None:
    """Group commit: while one write is in flight the next batch gathers, then goes at once."""
    sink = FakeSink()
    sink.gate.clear()
    batcher = Batcher(sink, BridgeMetrics(), max_batch=10, max_delay_s=3600.0,
                      backoff_max_s=0.01, trim_every_batches=0)  # fmt: skip
    async with asyncio.TaskGroup() as tg:
        writer = tg.create_task(batcher.run())
        first = submit(batcher, order(0))
        await asyncio.sleep(0.01)  # the writer took it and waits on the sink
        later = [submit(batcher, order(i)) for i in range(1, 7)]
        assert not first.done()
        sink.gate.set()
        async with asyncio.timeout(5):
            outcomes = [await first] + [await future for future in later]
        writer.cancel()
    assert outcomes == [ACCEPTED] * 7
    assert [len(orders) for orders, _ in sink.calls] == [1, 6]


async def test_a_backlog_still_goes_in_full_batches() -> None:
    """After a full batch the next waits (up to ``max_delay_s``) to fill: throughput under load."""
    sink = FakeSink()
    sink.gate.clear()
    batcher = Batcher(sink, BridgeMetrics(), max_batch=10, max_delay_s=3600.0,
                      backoff_max_s=0.01, trim_every_batches=0)  # fmt: skip
    async with asyncio.TaskGroup() as tg:
        writer = tg.create_task(batcher.run())
        futures = [submit(batcher, order(i)) for i in range(12)]  # a full batch and 2 more
        await asyncio.sleep(0.01)
        sink.gate.set()
        while len(sink.calls) < 1:  # noqa: ASYNC110 - polling a fake's call log is the point
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.05)
        assert len(sink.calls) == 1  # the 2 left over wait for the batch to fill
        futures += [submit(batcher, order(i)) for i in range(12, 20)]
        async with asyncio.timeout(5):
            outcomes = [await future for future in futures]
        writer.cancel()
    assert outcomes == [ACCEPTED] * 20
    assert [len(orders) for orders, _ in sink.calls] == [10, 10]


async def test_a_replica_shortfall_writes_the_batch_again() -> None:
    """After a shortfall the batch is written again (the retry may reach another node,
    whose WAIT says nothing of the first write); what the first write appended
    and the rewrite finds as its own duplicate is still answered accepted."""
    sink = ShortSink(shortfalls=2)
    batcher = make(sink)
    async with asyncio.TaskGroup() as tg:
        writer = tg.create_task(batcher.run())
        outcomes = await asyncio.gather(*(submit(batcher, order(i)) for i in range(3)))
        writer.cancel()
    assert sink.shortfalls == 0
    assert [len(orders) for orders, _ in sink.calls] == [3, 3, 3]
    assert outcomes == [ACCEPTED] * 3
