"""Geo mode without servers: the dedup digest, the circuit breaker, region settings, routing."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
from pathlib import Path
from typing import cast

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from bridge.batcher import Outcome
from bridge.breaker import BreakerState, CircuitBreaker
from bridge.config import BridgeConfig
from bridge.ingest import DeadLetter, ValidOrder, classify, payload_digest
from bridge.metrics import BridgeMetrics
from bridge.regions import UNKNOWN_LABELS_MAX, RegionMetrics, Regions, RemoteBatcher
from bridge.store import AppendResult, OrderSink
from schemas import Item, Order, Reason, encode
from servicekit.config import ConfigError, add_config_arguments, load_config

region_names = st.from_regex(r"[a-z0-9-]{1,32}", fullmatch=True)


def _order(**changes: object) -> Order:
    base = Order(
        v=1,
        order_id="order-00000001",
        device_id="dev-1",
        seq=7,
        created_at=1_700_000_000_000,
        currency="EUR",
        items=(Item(sku="cola", qty=2, unit_price=150),),
        total=300,
        attrs={"note": "attempts"},  # the word in a value must not confuse the digest
    )
    return msgspec.structs.replace(base, **changes)


@given(st.lists(region_names, max_size=32), st.lists(region_names, max_size=32))
def test_the_digest_ignores_attempts(first: list[str], second: list[str]) -> None:
    """Any two attempts lists of the same order hash alike: a resend is never a conflict."""
    a = encode(_order(attempts=tuple(first)))
    b = encode(_order(attempts=tuple(second)))
    assert payload_digest(a) == payload_digest(b)


@given(st.lists(region_names, min_size=1, max_size=3), st.integers(0, 10**6))
def test_the_digest_still_sees_every_other_field(attempts: list[str], seq: int) -> None:
    """Other content differs → the digest differs (a re-used id stays a conflict)."""
    a = encode(_order(attempts=tuple(attempts)))
    b = encode(_order(attempts=tuple(attempts), seq=seq + 8))
    assert payload_digest(a) != payload_digest(b)


def test_an_order_without_attempts_hashes_its_exact_bytes() -> None:
    """Markers written before geo mode still match: no attempts key, the raw bytes' hash."""
    payload = encode(_order())
    assert payload_digest(payload) == hashlib.blake2b(payload, digest_size=16).hexdigest()


def test_classify_names_the_authority() -> None:
    """attempts[0] is the authority; no attempts, none."""
    topic = "v1/devices/dev-1/orders"
    owned = classify(topic, encode(_order(attempts=("eu", "us"))), shards=4, received_at_ms=1)
    plain = classify(topic, encode(_order()), shards=4, received_at_ms=1)
    assert isinstance(owned, ValidOrder)
    assert isinstance(plain, ValidOrder)
    assert (owned.authority, plain.authority) == ("eu", None)
    assert owned.digest == plain.digest


def test_the_breaker_opens_waits_tries_once_and_closes() -> None:
    """closed → open after the threshold → half-open after open_s → closed on success."""
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=2, open_s=5, clock=lambda: now[0])
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state.label == "closed"
    breaker.record_failure()
    assert breaker.state.label == "open"
    assert not breaker.allow()
    now[0] = 5.0
    assert breaker.state.label == "half_open"
    assert breaker.allow()
    breaker.record_failure()  # the trial failed: open again at once, for another open_s
    assert breaker.state.label == "open"
    now[0] = 9.9
    assert not breaker.allow()
    now[0] = 10.0
    assert breaker.allow()
    breaker.record_success()
    assert (breaker.state, breaker.failures, breaker.opened) == (BreakerState.CLOSED, 0, 2)


def parse(argv: list[str], env: dict[str, str] | None = None) -> BridgeConfig:
    """Settings as the entrypoint builds them."""
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, BridgeConfig)
    return load_config(BridgeConfig, parser.parse_args(argv), env or {})


def test_region_flags_repeat_and_the_own_entry_is_the_local_redis() -> None:
    """--region-redis repeats (flags, ORDERS_REGION_REDIS, TOML); the own entry wins."""
    argv = [
        "--region",
        "eu",
        "--region-redis",
        "eu=redis://e:1/0",
        "--region-redis",
        "us=redis://u:2/0",
    ]
    config = parse(argv)
    assert config.region_urls() == {"eu": "redis://e:1/0", "us": "redis://u:2/0"}
    assert config.local_redis_url == "redis://e:1/0"
    from_env = parse([], {"ORDERS_REGION": "eu", "ORDERS_REGION_REDIS": "us=redis://u:2/0"})
    # No own entry: the own region's Redis is --redis-url.
    assert from_env.region_urls() == {"us": "redis://u:2/0", "eu": "redis://127.0.0.1:6379/0"}
    assert not parse([]).geo
    assert parse([]).region_urls() == {}


def test_region_settings_from_toml(tmp_path: Path) -> None:
    """The TOML file takes an array."""
    path = tmp_path / "bridge.toml"
    path.write_text('region = "us"\nregion_redis = ["eu=redis://e:1/0", "us=redis://u:2/0"]\n')
    config = parse(["--config", str(path)])
    assert config.local_redis_url == "redis://u:2/0"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--region-redis", "eu=redis://e:1/0"], "region_redis needs region"),
        (["--region", "EU"], "is not 1-32 chars"),
        (["--region", "eu", "--region-redis", "us"], "is not NAME=redis://"),
        (["--region", "eu", "--region-redis", "us=http://x"], "is not NAME=redis://"),
        (["--region", "eu", "--region-redis", "us=redis://a", "--region-redis", "us=redis://b"],
         "names 'us' twice"),
        (["--dedup-ttl-s", "100", "--agent-retry-horizon-s", "100"], "must be longer than"),
    ],
)  # fmt: skip
def test_bad_region_settings_are_refused(argv: list[str], message: str) -> None:
    """Each mistake is a ConfigError naming it (the CLI exits 2)."""
    with pytest.raises(ConfigError, match=message):
        parse(argv)


def test_routing_local_remote_and_unknown() -> None:
    """Own or no authority: local; a known remote: its writer; else `pending` (unknown_region),
    counted under the region's name."""
    config = parse(["--region", "eu", "--region-redis", "us=redis://u:2/0"])
    metrics = BridgeMetrics()
    regions = Regions(
        config,
        {"us": cast("OrderSink", _NeverSink())},
        metrics,
        on_conflict=lambda *_: None,
    )
    topic = "v1/devices/dev-1/orders"

    def route(*attempts: str) -> object:
        item = classify(topic, encode(_order(attempts=attempts)), shards=4, received_at_ms=1)
        assert isinstance(item, ValidOrder)
        return regions.route(item)

    assert route() is None
    assert route("eu", "us") is None
    assert isinstance(route("us", "eu"), RemoteBatcher)
    assert route("mars") == Outcome("pending", Reason.UNKNOWN_REGION)
    assert metrics.registry.get_sample_value("bridge_region_unknown_total", {"region": "mars"}) == 1
    assert regions.status()["unknown_regions"] == ["mars"]


def test_unknown_region_labels_are_bounded() -> None:
    """Device-supplied names: past UNKNOWN_LABELS_MAX distinct ones, the label is `other`."""
    config = parse(["--region", "eu"])
    metrics = BridgeMetrics()
    regions = Regions(config, {}, metrics, on_conflict=lambda *_: None)
    topic = "v1/devices/dev-1/orders"
    for n in range(UNKNOWN_LABELS_MAX + 5):
        item = classify(topic, encode(_order(attempts=(f"r{n}",))), shards=4, received_at_ms=1)
        assert isinstance(item, ValidOrder)
        assert regions.route(item) == Outcome("pending", Reason.UNKNOWN_REGION)
    names = regions.status()["unknown_regions"]
    assert len(names) == UNKNOWN_LABELS_MAX + 1
    assert "other" in names
    other = metrics.registry.get_sample_value("bridge_region_unknown_total", {"region": "other"})
    assert other == 5


class _NeverSink:
    """An OrderSink that is never called in the routing test."""

    async def write(self, *args: object, **kwargs: object) -> list[object]:
        raise AssertionError("not called")

    async def ping(self) -> float:
        raise AssertionError("not called")

    async def confirm_replicas(self) -> None:
        raise AssertionError("not called")

    async def inspect(self) -> object:
        raise AssertionError("not called")


class _SlowSink:
    """An OrderSink double: each write takes ``delay_s``, or hangs while ``hang`` is set."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.hang = False
        self.in_flight = 0
        self.peak = 0
        self.writes = 0
        self.conflict_ids: set[str] = set()

    async def write(
        self, orders: list[ValidOrder], dead: object, *, trim_shards: set[int]
    ) -> list[AppendResult]:
        self.writes += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(3600 if self.hang else self.delay_s)
        finally:
            self.in_flight -= 1
        return [
            AppendResult.CONFLICT if o.order_id in self.conflict_ids else AppendResult.APPENDED
            for o in orders
        ]


def _remote(
    sink: _SlowSink, *, concurrency: int, timeout_s: float = 5.0
) -> tuple[RemoteBatcher, list[tuple[DeadLetter, object]]]:
    conflicts: list[tuple[DeadLetter, object]] = []
    batcher = RemoteBatcher(
        "us",
        cast("OrderSink", sink),
        BridgeMetrics(),
        RegionMetrics(CollectorRegistry()),
        CircuitBreaker(failure_threshold=2, open_s=60),
        timeout_s=timeout_s,
        max_batch=500,
        on_conflict=lambda letter, done: conflicts.append((letter, done)),
        concurrency=concurrency,
    )
    return batcher, conflicts


def _valid(n: int) -> ValidOrder:
    item = classify(
        "v1/devices/dev-1/orders",
        encode(_order(order_id=f"order-{n:08d}", attempts=("us",))),
        shards=4,
        received_at_ms=1,
    )
    assert isinstance(item, ValidOrder)
    return item


async def test_remote_writes_overlap_up_to_the_concurrency() -> None:
    """Orders arriving one by one during slow writes go out in overlapping batches (≤ 4)."""
    sink = _SlowSink(delay_s=0.05)
    batcher, _ = _remote(sink, concurrency=4)
    outcomes: list[Outcome] = []
    task = asyncio.create_task(batcher.run())
    for n in range(12):
        batcher.add(_valid(n), outcomes.append)
        await asyncio.sleep(0.005)
    await asyncio.wait_for(batcher.drain(), 5)
    batcher.close()
    await asyncio.wait_for(task, 5)
    assert [o.result for o in outcomes] == ["accepted"] * 12
    assert sink.peak == 4
    assert batcher.pending == 0


async def test_a_hung_remote_answers_pending_after_the_timeout_then_the_breaker_opens() -> None:
    """Writes that hang end at the timeout as `pending`; after two, the breaker answers at once;
    a conflict goes to the local dead-letter path, not to the device as pending."""
    sink = _SlowSink(delay_s=0.0)
    sink.hang = True
    batcher, conflicts = _remote(sink, concurrency=1, timeout_s=0.05)
    outcomes: list[Outcome] = []
    task = asyncio.create_task(batcher.run())
    for n in range(2):
        batcher.add(_valid(n), outcomes.append)
        await asyncio.wait_for(batcher.drain(), 5)
    assert [(o.result, o.reason) for o in outcomes] == [PENDING_PAIR] * 2
    assert batcher.breaker.state.label == "open"
    writes = sink.writes
    batcher.add(_valid(2), outcomes.append)
    await asyncio.wait_for(batcher.drain(), 5)
    # Counted, not timed: a busy machine can stall the event loop past the 50 ms timeout.
    assert sink.writes == writes  # no write tried: the breaker answered
    assert outcomes[-1].result == "pending"
    batcher.breaker.record_success()
    sink.hang = False
    sink.conflict_ids = {"order-00000003"}
    batcher.add(_valid(3), outcomes.append)
    await asyncio.wait_for(batcher.drain(), 5)
    batcher.close()
    await asyncio.wait_for(task, 5)
    assert len(outcomes) == 3  # the conflict is settled by the local batcher, not here
    assert [(letter.reason, letter.order_id) for letter, _ in conflicts] == [
        (Reason.CONFLICT, "order-00000003")
    ]
    assert batcher.pending == 0


PENDING_PAIR = ("pending", Reason.AUTHORITY_UNREACHABLE)
