"""One fleet-sim run: connect the devices, place Poisson orders, inject chaos, settle, verify.

::

    result = await run(SimOptions(devices=1000, rate=100, duration_s=60), stack=stack)
    assert result.ok
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff

from schemas.names import DEFAULT_SHARDS
from servicekit.redis_clients import AnyRedis, redis_credentials, sentinel_address
from servicekit.urls import MqttUrl
from testrig.powercut import PowerCutMount
from testrig.proxy import TcpProxy
from testrig.sentinel import MASTER_NAME

from . import cpu
from .chaos import ChaosLog, ChaosRunner, FleetControl, check_feasible, needs_proxy, parse_schedule
from .devices import Catalog, Fleet, FleetSettings
from .errors import FleetError
from .live import LiveView
from .load import await_heard, offer_orders, settle, terminal_in
from .looplag import INTERVAL_S, LoopLag
from .report import RunRecord, Sample, percentiles, stage_breakdown
from .stack import DEMO_CATALOG, Stack
from .statuses import order_statuses
from .tracker import Tracker
from .verify import OrderRef, Verdict, count_stream_entries, verify
from .workers import RemoteFleet, worker_specs

log = structlog.get_logger(__name__)

# Devices whose outbox is a file on the power-cut disk when agent-powercut is scheduled.
AGENT_POWERCUT_DEVICES = 5
SENTINEL_TIMEOUT_S = 2.0
FAILOVER_RETRIES = 20  # with backoff capped at 1 s: rides out a promotion


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
    # Worker processes the devices are spread over (1: all in this process).
    processes: int = 1
    # How often an idle agent polls its outbox (FleetSettings.poll_interval_s).
    poll_interval_s: float = 0.5
    # Seconds after its receipt a device asks for a missing terminal status.
    status_query_delay_s: float = 3.0
    # Seconds without a broker before an agent moves to the next (several brokers).
    failover_after_s: float = 3.0
    # How many of the devices are lightweight devices (fleet.light) instead of real agents.
    light_devices: int = 0
    # Tick this often (s) on the simulator's event loop from the load's start to the end of
    # settling and record how late each wakeup came (RunRecord.loop_lag); 0: off. With
    # worker processes the devices' loops are theirs, so it is off.
    loop_lag_interval_s: float = 0.0


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
    # The worker processes that ran the devices (empty: they ran in this process).
    worker_pids: list[int] = field(default_factory=list)
    # time.monotonic() when the load began (samples' t_s count from here).
    load_started: float = 0.0

    @property
    def ok(self) -> bool:
        """Nothing lost, nothing duplicated, no rogue payload in a stream."""
        return self.verdict.ok and not self.rogue_in_streams


class _Driver(Protocol):
    """The devices as the run drives them: in this process, or in worker processes."""

    async def wait_connected(self, timeout_s: float) -> int: ...
    async def offer(self, started: float) -> None: ...
    async def finish(self) -> bool: ...
    def counts(self) -> tuple[int, int, int]: ...


class _LocalDriver:
    """All devices in this process: the load, quiescence and heard statuses run here."""

    def __init__(self, options: SimOptions, fleet: Fleet, redis: AnyRedis) -> None:
        self.options = options
        self.fleet = fleet
        self.redis = redis

    async def wait_connected(self, timeout_s: float) -> int:
        return await self.fleet.wait_connected(1.0, timeout_s)

    async def offer(self, started: float) -> None:
        o = self.options
        await offer_orders(self.fleet, rate=o.rate, duration_s=o.duration_s,
                           rng=random.Random(o.seed), catalog=Catalog.load(o.catalog),
                           started=started)  # fmt: skip

    async def finish(self) -> bool:
        tracker = self.fleet.tracker
        o = self.options
        terminal = functools.partial(terminal_in, [self.redis], shards=o.shards)
        settled = await settle(self.fleet, tracker, terminal, o.settle_timeout_s)
        await await_heard(tracker, self.options.status_wait_s)
        return settled

    def counts(self) -> tuple[int, int, int]:
        t = self.fleet.tracker
        return len(t.accepted), len(t.receipted), len(t.terminal)


async def run(options: SimOptions, stack: Stack | None = None) -> SimResult:
    """Run the load test against ``stack`` or the URLs in ``options``."""
    mqtt_url = options.mqtt_url or (stack.mqtt_url if stack else None)
    redis_url = options.redis_url or (stack.redis_url if stack else None)
    if mqtt_url is None or redis_url is None:
        raise FleetError("give --mqtt-url and --redis-url, or let fleet-sim start its stack")
    if options.processes < 1:
        raise FleetError("--processes must be at least 1")
    sentinels = stack.redis_sentinels if stack else ()
    cluster = stack is not None and stack.cluster is not None
    if (sentinels or cluster) and options.processes > 1:
        raise FleetError("a stack with Redis replicas or a Cluster needs --processes 1")
    events = parse_schedule(options.chaos)
    wants_proxy = needs_proxy(events)
    wants_disk = any(e.kind == "agent-powercut" for e in events)
    check_feasible(
        events, own_stack=stack is not None, proxy=wants_proxy, processes=options.processes
    )
    prefix = options.prefix or f"sim{uuid.uuid4().hex[:6]}"
    tracker = Tracker()
    record = RunRecord(options.devices, options.rate, options.duration_s)
    async with _redis(redis_url, sentinels, cluster=cluster) as redis:
        dlq_before = await redis.xlen("orders:dlq")
    # One client for the run (the settle loop survives its errors); Redis may be
    # restarted by the chaos, so the verification below gets a fresh one.
    async with (
        _redis(redis_url, sentinels, cluster=cluster) as redis,
        _maybe_proxy(mqtt_url, wants_proxy) as (device_url, proxy),
        _maybe_agent_disk(wants_disk) as disk,
        _devices(options, _fleet_settings(options, device_url, prefix, disk), tracker, redis,
                 redis_url) as (driver, control),
    ):  # fmt: skip
        connected = await driver.wait_connected(options.connect_timeout_s)
        log.info("fleet connected", connected=connected, devices=options.devices)
        chaos = ChaosRunner(
            events, stack=stack, proxy=proxy, fleet=control, mqtt_url=device_url, prefix=prefix,
            agent_disk=disk, processes=options.processes,
        )  # fmt: skip
        record.events = chaos.log.events
        worker_pids = control.pids if isinstance(control, RemoteFleet) else []
        cpu_before, cpu_t0 = cpu.read(stack, worker_pids), time.monotonic()

        def loaded() -> None:
            record.cpu_load = cpu.CpuUse.between(
                cpu_before, cpu.read(stack, worker_pids), time.monotonic() - cpu_t0
            )

        try:
            settled = await _drive(options, driver=driver, control=control, chaos=chaos,
                                   tracker=tracker, record=record, loaded=loaded)  # fmt: skip
        finally:
            chaos.restore()
        record.cpu = cpu.CpuUse.between(
            cpu_before, cpu.read(stack, worker_pids), time.monotonic() - cpu_t0
        )
    settled = await _durable(stack, tracker, options) and settled
    async with _redis(redis_url, sentinels, cluster=cluster) as redis:
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
        duplicate_receipts=tracker.duplicate_receipts, worker_pids=worker_pids,
        load_started=chaos.started,
    )  # fmt: skip


async def _durable(stack: Stack | None, tracker: Tracker, options: SimOptions) -> bool:
    """On a stack with Redis replicas: wait until no stale master is left and the master
    holds a terminal status for every accepted order; False if not within
    ``settle_timeout_s``.

    A master that was frozen past a failover is a master again for seconds after it
    resumes (until Sentinel demotes it): the pipeline may finish orders there, and its
    devices hear those statuses, but the demotion discards the writes and the pipeline
    does them again on the new master. Settling on what the devices heard, or reading
    the old master, would verify too early.
    """
    if stack is None or not stack.replicated:
        return True
    deadline = time.monotonic() + options.settle_timeout_s
    if not await asyncio.to_thread(stack.wait_single_master, options.settle_timeout_s):
        log.warning("stale master left", timeout_s=options.settle_timeout_s)
        return False
    cluster = stack.cluster is not None
    async with _redis(stack.redis_url, stack.redis_sentinels, cluster=cluster) as redis:
        waiting = sorted(tracker.accepted)
        while waiting:
            done = await terminal_in([redis], waiting, options.shards)
            waiting = [ref for ref in waiting if ref not in done]
            if waiting and time.monotonic() > deadline:
                log.warning("not durable", without_status=len(waiting))
                return False
            if waiting:
                await asyncio.sleep(0.5)
    return True


@contextlib.asynccontextmanager
async def _devices(
    options: SimOptions,
    settings: FleetSettings,
    tracker: Tracker,
    redis: AnyRedis,
    redis_url: str,
) -> AsyncIterator[tuple[_Driver, FleetControl]]:
    """The fleet in this process, or spread over ``options.processes`` worker processes."""
    if options.processes == 1:
        async with Fleet(settings, tracker) as fleet:
            yield _LocalDriver(options, fleet, redis), fleet
        return
    specs = worker_specs(
        settings, options.processes, rate=options.rate, seed=options.seed,
        duration_s=options.duration_s, catalog=options.catalog, redis_url=redis_url,
        settle_timeout_s=options.settle_timeout_s, status_wait_s=options.status_wait_s,
        connect_timeout_s=options.connect_timeout_s, shards=options.shards,
    )  # fmt: skip
    async with RemoteFleet(specs, tracker) as remote:
        yield remote, remote


def _fleet_settings(
    options: SimOptions, mqtt_url: str, prefix: str, disk: PowerCutMount | None
) -> FleetSettings:
    return FleetSettings(
        options.devices, mqtt_url, prefix, options.ramp_per_s, options.receipt_timeout_s,
        disk=None if disk is None else disk.path,
        disk_devices=0 if disk is None else AGENT_POWERCUT_DEVICES,
        poll_interval_s=options.poll_interval_s,
        status_query_delay_s=options.status_query_delay_s,
        failover_after_s=options.failover_after_s,
        light_devices=options.light_devices,
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
async def _redis(
    url: str, sentinels: tuple[str, ...] = (), *, cluster: bool = False
) -> AsyncIterator[AnyRedis]:
    """A client of the stack's Redis; with Sentinels, of whichever node is master now
    (it retries through a failover: the verification must not end on one); of a Cluster
    (which follows a promotion itself) with ``cluster``."""
    if cluster:
        retry = Retry(ExponentialBackoff(cap=1.0), FAILOVER_RETRIES)
        nodes = RedisCluster.from_url(url, retry=retry)
        try:
            yield nodes
        finally:
            await nodes.aclose()
        return
    if not sentinels:
        client = aioredis.from_url(url)
        try:
            yield client
        finally:
            await client.aclose()
        return
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        [sentinel_address(entry) for entry in sentinels], socket_timeout=SENTINEL_TIMEOUT_S
    )
    master: aioredis.Redis = sentinel.master_for(
        MASTER_NAME,
        redis_class=aioredis.Redis,
        retry=Retry(ExponentialBackoff(cap=1.0), FAILOVER_RETRIES),
        **redis_credentials(url),
    )
    try:
        yield master
    finally:
        await master.aclose()
        await sentinel.aclose()


@contextlib.asynccontextmanager
async def _maybe_proxy(mqtt_url: str, wanted: bool) -> AsyncIterator[tuple[str, TcpProxy | None]]:
    if not wanted:
        yield mqtt_url, None
        return
    if "," in mqtt_url:
        raise FleetError("the proxy's network faults need a single broker (no --brokers N)")
    url = MqttUrl.parse(mqtt_url)
    async with TcpProxy(url.host, url.port) as proxy:
        scheme = "mqtts" if url.tls else "mqtt"
        auth = f"{url.username}:{url.password or ''}@" if url.username else ""
        yield f"{scheme}://{auth}127.0.0.1:{proxy.port}", proxy


async def _drive(
    options: SimOptions,
    *,
    driver: _Driver,
    control: FleetControl,
    chaos: ChaosRunner,
    tracker: Tracker,
    record: RunRecord,
    loaded: Callable[[], None],
) -> bool:
    started = time.monotonic()
    stop_sampling = asyncio.Event()
    lag = LoopLag(options.loop_lag_interval_s or INTERVAL_S)
    async with contextlib.AsyncExitStack() as probe:
        if options.loop_lag_interval_s > 0 and options.processes == 1:
            await probe.enter_async_context(lag.running())
        with LiveView(enabled=options.live) as view:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(
                    _sample(driver, control, tracker=tracker, record=record, started=started,
                            stop=stop_sampling, view=view),
                    name="sampler",
                )  # fmt: skip
                chaos_task = tg.create_task(chaos.run(started), name="chaos")
                await driver.offer(started)
                loaded()
                await chaos_task
                settled = await driver.finish()
                stop_sampling.set()
    record.loop_lag = [tick._replace(t=tick.t - started) for tick in lag.samples]
    return settled


async def _sample(
    driver: _Driver,
    control: FleetControl,
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
        submitted, receipted, processed = driver.counts()
        sample = Sample(
            t_s=time.monotonic() - started,
            connected=control.connected(),
            submitted=submitted,
            accepted=receipted,
            processed=processed,
            outbox_depth=control.outbox_depth(),
            receipt_p50_ms=receipts.get(50),
            receipt_p99_ms=receipts.get(99),
            e2e_p50_ms=e2e.get(50),
            e2e_p99_ms=e2e.get(99),
        )
        record.samples.append(sample)
        view.update(record, tracker, control.size)
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
