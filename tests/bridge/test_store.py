"""The atomic dedup + append script and the DLQ writes, against a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.ingest import DeadLetter, ValidOrder, classify
from bridge.store import AppendResult, RedisSink
from schemas import encode
from schemas.names import DLQ_STREAM, orders_topic, seen_key, stream_key
from tests.helpers import make_order

SHARDS = 4


def valid(device_id: str, seq: int, *, qty: int = 1, received_at_ms: int = 1) -> ValidOrder:
    """A classified valid order."""
    item = classify(
        orders_topic(device_id),
        encode(make_order(device_id, seq, [("COLA-33", qty, 150)])),
        shards=SHARDS,
        received_at_ms=received_at_ms,
    )
    assert isinstance(item, ValidOrder)
    return item


@pytest.fixture
async def sink(redis_url: str) -> AsyncIterator[RedisSink]:
    """A sink on the shared (flushed) Redis."""
    async with RedisSink(redis_url, dedup_ttl_s=60, dlq_maxlen=1000) as store:
        yield store


async def test_append_then_duplicate_then_conflict(sink: RedisSink, redis_url: str) -> None:
    """Same bytes again is a duplicate; same order_id with other bytes is a conflict."""
    first = valid("dev-a", 1)
    assert await sink.write([first], [], trim_shards=set()) == [AppendResult.APPENDED]
    assert await sink.write([first], [], trim_shards=set()) == [AppendResult.DUPLICATE]
    other = valid("dev-a", 1, qty=2)
    assert await sink.write([other], [], trim_shards=set()) == [AppendResult.CONFLICT]
    with redis.Redis.from_url(redis_url) as client:
        entries = client.xrange(stream_key(first.shard))
        assert len(entries) == 1
        fields = entries[0][1]
        assert fields[b"order_id"] == first.order_id.encode()
        assert fields[b"device_id"] == b"dev-a"
        assert fields[b"seq"] == b"1"
        assert fields[b"payload"] == first.payload
        marker = seen_key(first.shard, "dev-a", first.order_id)
        assert client.get(marker) == first.digest.encode()
        assert 0 < client.ttl(marker) <= 60


async def test_duplicates_inside_one_batch(sink: RedisSink, redis_url: str) -> None:
    """Two copies in one batch: the first is appended, the second answered duplicate."""
    order = valid("dev-b", 3)
    results = await sink.write([order, order], [], trim_shards=set())
    assert results == [AppendResult.APPENDED, AppendResult.DUPLICATE]


async def test_dead_letters_keep_raw_bytes(sink: RedisSink, redis_url: str) -> None:
    """A dead letter stores reason, topic, the raw payload and received_at."""
    letter = DeadLetter("malformed", "v1/devices/x/orders", b"\xff\x00raw", 42, "x", None)
    assert await sink.write([], [letter], trim_shards=set()) == []
    with redis.Redis.from_url(redis_url) as client:
        [(_, fields)] = client.xrange(DLQ_STREAM)
    assert fields == {
        b"reason": b"malformed",
        b"topic": b"v1/devices/x/orders",
        b"payload": b"\xff\x00raw",
        b"received_at": b"42",
    }


async def test_trim_never_passes_unread_or_pending(sink: RedisSink, redis_url: str) -> None:
    """MINID trimming keeps everything a consumer group has not read and acked."""
    device = "dev-trim"
    shard = valid(device, 0).shard
    key = stream_key(shard)
    # No consumer group yet: trimming must keep everything.
    await sink.write([valid(device, i) for i in range(300)], [], trim_shards={shard})
    with redis.Redis.from_url(redis_url) as client:
        assert client.xlen(key) == 300
        client.xgroup_create(key, "pipeline", id="0")
        read = client.xreadgroup("pipeline", "w1", {key: ">"}, count=250)
        ids = [entry_id for entry_id, _ in read[0][1]]
        client.xack(key, "pipeline", *ids[:200])  # 50 stay pending
    await sink.write([valid(device, 1000)], [], trim_shards={shard})
    with redis.Redis.from_url(redis_url) as client:
        remaining = [entry_id for entry_id, _ in client.xrange(key)]
    # Every pending and every unread entry survives; acked ones may go (approximately).
    assert set(ids[200:]) <= set(remaining)
    assert len(remaining) >= 300 + 1 - 200
    assert len(remaining) < 301, "acked entries below the floor were not trimmed"


orders_with_copies = st.lists(
    st.tuples(st.sampled_from(["d1", "d2", "d3"]), st.integers(0, 5)), min_size=1, max_size=40
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sends=orders_with_copies, split=st.integers(1, 8))
def test_any_interleaving_of_duplicates_gives_one_entry_per_order(
    redis_url: str, sends: list[tuple[str, int]], split: int
) -> None:
    """Whatever the order and batching of copies, each order is appended exactly once."""
    with redis.Redis.from_url(redis_url) as client:
        client.flushall()

    async def run() -> list[AppendResult]:
        async with RedisSink(redis_url, dedup_ttl_s=60, dlq_maxlen=1000) as store:
            items = [valid(device, seq) for device, seq in sends]
            results: list[AppendResult] = []
            for start in range(0, len(items), split):
                results += await store.write(items[start : start + split], [], trim_shards=set())
            return results

    results = asyncio.run(run())
    assert results.count(AppendResult.APPENDED) == len(set(sends))
    assert AppendResult.CONFLICT not in results
    with redis.Redis.from_url(redis_url) as client:
        stored = [
            (fields[b"device_id"].decode(), int(fields[b"seq"]))
            for shard in range(SHARDS)
            for _, fields in client.xrange(stream_key(shard))
        ]
    assert sorted(stored) == sorted(set(sends))
