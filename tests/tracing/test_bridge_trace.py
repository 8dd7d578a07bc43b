"""The bridge's part of the trace: user property in, stream field ``trace`` out, dedup untouched."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis

from bridge.ingest import ValidOrder, classify
from bridge.store import AppendResult, RedisSink
from schemas import encode
from schemas.names import TRACE_STREAM_FIELD, orders_topic, stream_key
from servicekit import tracing
from tests.helpers import make_order

SHARDS = 4


def valid(device_id: str, seq: int, trace: str | None) -> ValidOrder:
    """An order classified with ``trace`` as its ``traceparent`` user property."""
    payload = encode(make_order(device_id, seq))
    item = classify(orders_topic(device_id), payload, shards=SHARDS, received_at_ms=1, trace=trace)
    assert isinstance(item, ValidOrder)
    return item


@pytest.fixture
async def sink(redis_url: str) -> AsyncIterator[RedisSink]:
    """A sink on the shared (flushed) Redis."""
    async with RedisSink(redis_url, dedup_ttl_s=60, dlq_maxlen=1000) as store:
        yield store


def entries(redis_url: str, shard: int) -> list[dict[bytes, bytes]]:
    with redis.Redis.from_url(redis_url) as client:
        return [fields for _, fields in client.xrange(stream_key(shard))]


async def test_trace_is_written_and_not_part_of_the_dedup_digest(
    sink: RedisSink, redis_url: str
) -> None:
    """The first send's traceparent is the entry's `trace`; a resend with another is `duplicate`."""
    first_tp = tracing.new_traceparent(sampled=True)
    first = valid("dev-t", 1, first_tp)
    assert first.trace == first_tp
    again = valid("dev-t", 1, tracing.new_traceparent(sampled=True))  # a resend: new span id
    bare = valid("dev-t", 1, None)  # an old agent's resend: no property
    assert await sink.write([first], [], trim_shards=set()) == [AppendResult.APPENDED]
    assert await sink.write([again, bare], [], trim_shards=set()) == [AppendResult.DUPLICATE] * 2
    (entry,) = entries(redis_url, first.shard)
    assert entry[TRACE_STREAM_FIELD.encode()] == first_tp.encode()
    assert entry[b"payload"] == first.payload


@pytest.mark.parametrize(
    "trace",
    [None, "", "x" * 55, "00-" + "a" * 32 + "-" + "b" * 16 + "-01\n", "t" * 20_000],
)
async def test_no_or_a_malformed_traceparent_leaves_the_field_out(
    sink: RedisSink, redis_url: str, trace: str | None
) -> None:
    """Absent or malformed: the order is accepted as before, without a `trace` field."""
    order = valid("dev-u", 7, trace)
    assert order.trace is None
    assert await sink.write([order], [], trim_shards=set()) == [AppendResult.APPENDED]
    (entry,) = entries(redis_url, order.shard)
    assert set(entry) == {b"order_id", b"device_id", b"seq", b"received_at", b"payload"}


async def test_a_batch_mixes_traced_and_untraced_orders(sink: RedisSink, redis_url: str) -> None:
    """Per order: the script writes `trace` only for orders that carry one."""
    traced = [tracing.new_traceparent(sampled=i % 2 == 0) if i % 3 else None for i in range(12)]
    orders = [valid("dev-m", seq, tp) for seq, tp in enumerate(traced)]
    assert await sink.write(orders, [], trim_shards=set()) == [AppendResult.APPENDED] * 12
    got = [e.get(TRACE_STREAM_FIELD.encode()) for e in entries(redis_url, orders[0].shard)]
    assert got == [None if tp is None else tp.encode() for tp in traced]
