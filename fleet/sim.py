"""One fleet-sim run: connect the devices, place Poisson orders, inject chaos, settle, verify.

::

    result = await run(SimOptions(devices=1000, rate=100, duration_s=60), stack=stack)
    assert result.ok
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from schemas.names import DEFAULT_SHARDS
from servicekit.urls import MqttUrl

from .chaos import PROXY_KINDS, ChaosLog, ChaosRunner, check_feasible, parse_schedule
from .devices import Catalog, Fleet, FleetSettings
from .errors import FleetError
from .live import LiveView
from .powercut import PowerCutMount
from .proxy import TcpProxy
from .report import RunRecord, Sample, percentiles, stage_breakdown
from .stack import DEMO_CATALOG, Stack
from .statuses import order_statuses
from .tracker import TERMINAL, Tracker
from .verify import OrderRef, Verdict, count_stream_entries, verify

log = structlog.get_logger(__name__)

SUBMIT_CONCURRENCY = 2_000
# Devices whose outbox is a file on the power-cut disk when agent-powercut is scheduled.
AGENT_POWERCUT_DEVICES = 5


@dataclass(frozen=True)
class SimOptions:
    """What to run. URLs None: the stack passed to :func:`run` is used."""

    devices: int = 100
    rate: float = 50.0
    duration_s: float = 30.0
    mqtt_url: str | None = None
    redis_url: str | None = None
    shards: int = DEFAULT_SHARDS
    chaos: str = ""
    seed: int = 0
    settle_timeout_s: float = 120.0
    # After quiescence, how long devices may take to hear the last terminal statuses
    # (status recovery resends what the broker lost); then unheard ones fail the run.
    status_wait_s: float = 30.0
    connect_timeout_s: float = 60.0
    ramp_per_s: float = 500.0
    receipt_timeout_s: float = 10.0
    catalog: Path = DEMO_CATALOG
    live: bool = False
    prefix: str = ""


@dataclass
class SimResult:
    """The run's record and everything the verdict rests on."""

    record: RunRecord
    verdict: Verdict
    settled: bool
    chaos: ChaosLog
    rogue_in_streams: list[OrderRef] = field(default_factory=list)
    dlq_added: int = 0
    duplicate_receipts: int = 0

    @property
    def ok(self) -> bool:
        """Nothing lost, nothing duplicated, no rogue payload in a stream."""
        return self.verdict.ok and not self.rogue_in_streams


async def run(options: SimOptions, stack: Stack | None = None) -> SimResult:
    """Run the load test against ``stack`` or the URLs in ``options``."""
    mqtt_url = options.mqtt_url or (stack.mqtt_url if stack else None)
    redis_url = options.redis_url or (stack.redis_url if stack else None)
    if mqtt_url is None or redis_url is None:
        raise FleetError("give --mqtt-url and --redis-url, or let fleet-sim start its stack")
    events = parse_schedule(options.chaos)
    wants_proxy = any(e.kind in PROXY_KINDS for e in events)
    wants_disk = any(e.kind == "agent-powercut" for e in events)
    check_feasible(events, own_stack=stack is not None, proxy=wants_proxy)
    prefix = options.prefix or f"sim{uuid.uuid4().hex[:6]}"
    rng = random.Random(options.seed)
    catalog = Catalog.load(options.catalog)
    tracker = Tracker()
    record = RunRecord(options.devices, options.rate, options.duration_s)
    async with _redis(redis_url) as redis:
        dlq_before = await redis.xlen("orders:dlq")
    # One client for the run (the settle loop survives its errors); Redis may be
    # restarted by the chaos, so the verification below gets a fresh one.
    async with (
        _redis(redis_url) as redis,
        _maybe_proxy(mqtt_url, wants_proxy) as (device_url, proxy),
        _maybe_agent_disk(wants_disk) as disk,
        Fleet(_fleet_settings(options, device_url, prefix, disk), tracker) as fleet,
    ):
        connected = await fleet.wait_connected(1.0, options.connect_timeout_s)
        log.info("fleet connected", connected=connected, devices=options.devices)
        chaos = ChaosRunner(
            events, stack=stack, proxy=proxy, fleet=fleet, mqtt_url=device_url, prefix=prefix,
            agent_disk=disk,
        )  # fmt: skip
        record.events = chaos.log.events
        try:
            settled = await _drive(
                options, fleet=fleet, chaos=chaos, tracker=tracker, record=record,
                redis=redis, rng=rng, catalog=catalog,
            )  # fmt: skip
        finally:
            chaos.restore()
    async with _redis(redis_url) as redis:
        verdict = await verify(
            redis,
            tracker.accepted,
            shards=options.shards,
            statuses=lambda refs: order_statuses(redis, refs, options.shards),
            heard=tracker.terminal,
            pipeline_writes=True,
        )
        rogue_in_streams: list[OrderRef] = []
        if chaos.log.rogue:
            counts = await count_stream_entries(redis, options.shards)
            rogue_ids = {r.device_id for r in chaos.log.rogue}
            spoofed = {ref for r in chaos.log.rogue for ref in r.spoofed}
            rogue_in_streams = [ref for ref in counts if ref[0] in rogue_ids or ref in spoofed]
        dlq_added = await redis.xlen("orders:dlq") - dlq_before
        record.stages = await stage_breakdown(redis, options.shards, tracker)
    record.verdict = verdict
    record.refused = tracker.refused
    record.receipt_latency_ms = tracker.receipt_latency_ms
    record.e2e_latency_ms = tracker.e2e_latency_ms
    return SimResult(
        record, verdict, settled, chaos.log, rogue_in_streams, dlq_added,
        duplicate_receipts=tracker.duplicate_receipts,
    )  # fmt: skip


def _fleet_settings(
    options: SimOptions, mqtt_url: str, prefix: str, disk: PowerCutMount | None
) -> FleetSettings:
    return FleetSettings(
        options.devices, mqtt_url, prefix, options.ramp_per_s, options.receipt_timeout_s,
        disk=None if disk is None else disk.path,
        disk_devices=0 if disk is None else AGENT_POWERCUT_DEVICES,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def _maybe_agent_disk(wanted: bool) -> AsyncIterator[PowerCutMount | None]:
    """A power-cut filesystem for the file outboxes of agent-powercut's devices."""
    if not wanted:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="fleet-agent-disk-") as tmp:
        mount = PowerCutMount(Path(tmp))
        await asyncio.to_thread(mount.start)
        try:
            yield mount
        finally:
            await asyncio.to_thread(mount.stop)


@contextlib.asynccontextmanager
async def _redis(url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def _maybe_proxy(mqtt_url: str, wanted: bool) -> AsyncIterator[tuple[str, TcpProxy | None]]:
    if not wanted:
        yield mqtt_url, None
        return
    url = MqttUrl.parse(mqtt_url)
    async with TcpProxy(url.host, url.port) as proxy:
        scheme = "mqtts" if url.tls else "mqtt"
        auth = f"{url.username}:{url.password or ''}@" if url.username else ""
        yield f"{scheme}://{auth}127.0.0.1:{proxy.port}", proxy


async def _drive(
    options: SimOptions,
    *,
    fleet: Fleet,
    chaos: ChaosRunner,
    tracker: Tracker,
    record: RunRecord,
    redis: aioredis.Redis,
    rng: random.Random,
    catalog: Catalog,
) -> bool:
    started = time.monotonic()
    stop_sampling = asyncio.Event()
    with LiveView(enabled=options.live) as view:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(
                _sample(
                    fleet,
                    tracker=tracker,
                    record=record,
                    started=started,
                    stop=stop_sampling,
                    view=view,
                ),
                name="sampler",
            )
            chaos_task = tg.create_task(chaos.run(started), name="chaos")
            await _load(options, fleet, rng, catalog, started)
            await chaos_task
            settled = await _settle(fleet, tracker, redis, options.settle_timeout_s, options.shards)
            await _await_heard(tracker, options.status_wait_s)
            stop_sampling.set()
    return settled


async def _load(
    options: SimOptions, fleet: Fleet, rng: random.Random, catalog: Catalog, started: float
) -> None:
    """Poisson arrivals at ``rate`` orders/s over random devices, for ``duration_s``."""
    if options.rate <= 0 or not fleet.devices:
        await asyncio.sleep(options.duration_s)
        return
    slots = asyncio.Semaphore(SUBMIT_CONCURRENCY)
    next_at = started
    end = started + options.duration_s

    async def one(body: dict[str, object]) -> None:
        try:
            await rng.choice(fleet.devices).submit(body)
        finally:
            slots.release()

    async with asyncio.TaskGroup() as tg:
        while True:
            next_at += rng.expovariate(options.rate)
            if next_at >= end:
                break
            if (delay := next_at - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            await slots.acquire()
            tg.create_task(one(catalog.order_body(rng)))
    await asyncio.sleep(max(0.0, end - time.monotonic()))


async def _sample(
    fleet: Fleet,
    *,
    tracker: Tracker,
    record: RunRecord,
    started: float,
    stop: asyncio.Event,
    view: LiveView,
) -> None:
    seen_receipts = seen_e2e = 0
    while True:
        receipts = percentiles(tracker.receipt_latency_ms[seen_receipts:])
        e2e = percentiles(tracker.e2e_latency_ms[seen_e2e:])
        seen_receipts, seen_e2e = len(tracker.receipt_latency_ms), len(tracker.e2e_latency_ms)
        sample = Sample(
            t_s=time.monotonic() - started,
            connected=fleet.connected(),
            submitted=len(tracker.accepted),
            accepted=len(tracker.receipted),
            processed=len(tracker.terminal),
            outbox_depth=fleet.outbox_depth(),
            receipt_p50_ms=receipts.get(50),
            receipt_p99_ms=receipts.get(99),
            e2e_p50_ms=e2e.get(50),
            e2e_p99_ms=e2e.get(99),
        )
        record.samples.append(sample)
        view.update(record, tracker, len(fleet.devices))
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def _await_heard(tracker: Tracker, timeout_s: float) -> None:
    """Wait until every device heard a terminal status for each of its accepted orders."""
    deadline = time.monotonic() + timeout_s
    while any(ref not in tracker.terminal for ref in tracker.accepted):
        if time.monotonic() > deadline:
            unheard = sum(1 for ref in tracker.accepted if ref not in tracker.terminal)
            log.warning("terminal statuses never heard", orders=unheard)
            return
        await asyncio.sleep(0.2)


async def _settle(
    fleet: Fleet, tracker: Tracker, redis: aioredis.Redis, timeout_s: float, shards: int
) -> bool:
    """Wait until every outbox is empty and every accepted order has a terminal status."""
    deadline = time.monotonic() + timeout_s
    waiting: set[OrderRef] = set(tracker.accepted)
    while True:
        depth = fleet.outbox_depth()
        if depth == 0:
            waiting -= tracker.terminal
            if waiting:
                refs = sorted(waiting)
                try:
                    found = await order_statuses(redis, refs, shards)
                except RedisError:
                    found = [None] * len(refs)
                waiting -= {ref for ref, s in zip(refs, found, strict=True) if s in TERMINAL}
            if not waiting:
                return True
        if time.monotonic() > deadline:
            log.warning("not quiescent", outbox_depth=depth, without_status=len(waiting))
            return False
        await asyncio.sleep(0.5)
