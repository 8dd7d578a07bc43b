"""A fleet-sim run on the geo rig: devices homed across regions, geo chaos, the geo verdict.

Each simulated device is a real :class:`edge_agent.EdgeAgent` in geo mode: its
region list is the rig's, rotated so that its home comes first (device i is
homed in region i mod N, or all in one region with ``homes``). Orders arrive
as a Poisson stream over random devices; the chaos schedule may hold any
:mod:`fleet.geo.chaos` kind plus the kinds that need no stack (``dup-flood``,
``clock-skew``). While the run goes, a :class:`fleet.geo.verify.CountMonitor`
samples the merged counts (no order may ever count twice) and the orders in
doubt; at the end :func:`fleet.geo.verify.verify_geo` checks everything.

::

    result = await run_geo(GeoOptions(devices=30, chaos="5:region-down=eu/8"), geo)
    assert result.ok
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis
import structlog

from edge_agent import AgentConfig

from ..chaos import ChaosLog, ChaosRunner, parse_schedule
from ..devices import Catalog, Fleet, FleetSettings
from ..load import await_heard, offer_orders, settle, terminal_in
from ..report import RunRecord, Sample
from ..stack import DEMO_CATALOG
from ..statuses import order_statuses
from ..tracker import Tracker
from ..verify import OrderRef
from .chaos import GEO_KINDS, GeoChaosRunner
from .stack import GeoStack
from .verify import CountMonitor, GeoVerdict, OutboxRow, read_outbox, verify_geo

log = structlog.get_logger(__name__)

SUBMIT_CONCURRENCY = 500


@dataclass(frozen=True)
class GeoOptions:
    """What to run on the rig."""

    devices: int = 30
    rate: float = 20.0
    duration_s: float = 20.0
    chaos: str = ""
    seed: int = 0
    # Where devices live: "" spreads homes over the regions; a region name homes all there.
    homes: str = ""
    settle_timeout_s: float = 120.0
    status_wait_s: float = 15.0
    receipt_timeout_s: float = 5.0
    failover_after_s: float = 3.0
    failback_probe_s: float = 2.0
    pending_retry_min_s: float = 0.5
    pending_retry_max_s: float = 3.0
    max_inflight: int = 20
    catalog: Path = DEMO_CATALOG
    prefix: str = ""


@dataclass
class GeoResult:
    """The run's record and the geo verdict."""

    record: RunRecord
    verdict: GeoVerdict
    settled: bool
    chaos: ChaosLog
    homes: dict[str, int] = field(default_factory=dict)  # region → devices homed there
    in_doubt_bound: int = 0  # in-flight window × devices of the largest region

    @property
    def ok(self) -> bool:
        """The verdict passed and the run reached quiescence."""
        return self.verdict.ok and self.settled

    def lines(self) -> list[str]:
        """The geo part of the report."""
        homes = ", ".join(f"{name}: {n}" for name, n in self.homes.items())
        out = [f"devices per home region: {homes}"]
        out += [f"chaos @{t:,.0f}s {label}" for t, label in sorted(self.chaos.events)]
        out += self.verdict.lines()
        out.insert(
            -1,
            f"in-doubt bound (in-flight window × devices of one region): {self.in_doubt_bound}",
        )
        if not self.settled:
            out.insert(-1, "the run did not reach quiescence before the settle timeout")
        return out


def agent_region_entries(geo: GeoStack, home: int | str) -> tuple[str, ...]:
    """``NAME=URL`` entries for an agent homed in ``home`` (the agent's ``region`` setting)."""
    return tuple(f"{name}={url}" for name, url in geo.agent_regions(home))


class GeoFleet(Fleet):
    """Simulated devices in geo mode, homes spread over the rig's regions."""

    def __init__(
        self, settings: FleetSettings, tracker: Tracker, geo: GeoStack, options: GeoOptions
    ) -> None:
        super().__init__(settings, tracker)
        self.geo = geo
        self.options = options

    def home_of(self, index: int) -> str:
        """The home region of device ``index``."""
        return self.options.homes or self.geo.names[index % len(self.geo.names)]

    def _config(self, index: int) -> AgentConfig:
        o = self.options
        geo_fields: dict[str, Any] = {
            "region": agent_region_entries(self.geo, self.home_of(index)),
            "failover_after_s": o.failover_after_s,
            "failback_probe_s": o.failback_probe_s,
            "pending_retry_min_s": o.pending_retry_min_s,
            "pending_retry_max_s": o.pending_retry_max_s,
        }
        known = AgentConfig.__struct_fields__
        return msgspec.structs.replace(
            super()._config(index),
            mqtt_url=self.geo.region(self.home_of(index)).mqtt_url,
            max_inflight=o.max_inflight,
            **{k: v for k, v in geo_fields.items() if k in known},
        )

    def outboxes(self) -> dict[OrderRef, OutboxRow]:
        """Every device's outbox rows (attempts, settled), read through its open store."""
        out: dict[OrderRef, OutboxRow] = {}
        for device in self.agents:
            store = device.agent.outbox.store
            if store.is_open:
                for order_id, row in read_outbox(store.conn).items():
                    out[(device.device_id, order_id)] = row
        return out

    def in_doubt(self, down: set[str]) -> int:
        """Published, unreceipted orders whose authority is a region in ``down``."""
        if not down:
            return 0
        count = 0
        for device in self.agents:
            store = device.agent.outbox.store
            if not store.is_open:
                continue
            rows = store.conn.execute(
                "SELECT regions FROM orders WHERE settled_ms IS NULL AND regions != ''"
            )
            count += sum(1 for (regions,) in rows if str(regions).split(",")[0] in down)
        return count


async def run_geo(options: GeoOptions, geo: GeoStack) -> GeoResult:
    """Run the load with the chaos schedule on ``geo``, settle, verify."""
    events = parse_schedule(options.chaos)
    prefix = options.prefix or f"geo{uuid.uuid4().hex[:6]}"
    rng = random.Random(options.seed)
    catalog = Catalog.load(options.catalog)
    tracker = Tracker()
    record = RunRecord(options.devices, options.rate, options.duration_s)
    chaos_log = ChaosLog()
    record.events = chaos_log.events
    settings = FleetSettings(
        options.devices, geo.regions[0].mqtt_url, prefix,
        receipt_timeout_s=options.receipt_timeout_s,
    )  # fmt: skip
    fleet = GeoFleet(settings, tracker, geo, options)
    async with _clients(geo) as clients, fleet:
        geo_chaos = GeoChaosRunner(events, geo, chaos_log, connected=fleet.connected)
        # The kinds that need no stack run as in a single-region run (dup-flood, clock-skew).
        other = ChaosRunner(
            [e for e in events if e.kind not in GEO_KINDS], stack=None, proxy=None, fleet=fleet,
            mqtt_url=geo.regions[0].mqtt_url, prefix=prefix,
        )  # fmt: skip
        other.log = chaos_log
        monitor = CountMonitor(clients, geo.settings.shards, lambda: fleet.in_doubt(_down(geo)))
        await fleet.wait_connected(1.0, 60.0)
        started = time.monotonic()
        stop = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(monitor.run(stop), name="monitor")
                tg.create_task(_sample(fleet, tracker, record, started, stop), name="sampler")
                chaos_tasks = [
                    tg.create_task(geo_chaos.run(started), name="geo-chaos"),
                    tg.create_task(other.run(started), name="chaos"),
                ]
                await offer_orders(
                    fleet, rate=options.rate, duration_s=options.duration_s, rng=rng,
                    catalog=catalog, started=started, concurrency=SUBMIT_CONCURRENCY,
                )  # fmt: skip
                await asyncio.gather(*chaos_tasks)
                terminal = functools.partial(
                    terminal_in, clients.values(), shards=geo.settings.shards
                )
                settled = await settle(fleet, tracker, terminal, options.settle_timeout_s)
                await await_heard(tracker, options.status_wait_s)
                stop.set()
        finally:
            other.restore()
        verdict = await verify_geo(
            clients, tracker.accepted, fleet.outboxes(), shards=geo.settings.shards,
            statuses=order_statuses, heard=tracker.terminal, monitor=monitor,
        )  # fmt: skip
        homes = dict.fromkeys(geo.names, 0)
        for index in range(len(fleet.devices)):
            homes[fleet.home_of(index)] += 1
    record.refused = tracker.refused
    record.receipt_latency_ms = tracker.receipt_latency_ms
    record.e2e_latency_ms = tracker.e2e_latency_ms
    bound = max(homes.values(), default=0) * options.max_inflight
    return GeoResult(record, verdict, settled, chaos_log, homes, bound)


def _down(geo: GeoStack) -> set[str]:
    return {region.name for region in geo.regions if region.is_down}


@contextlib.asynccontextmanager
async def _clients(geo: GeoStack) -> AsyncIterator[dict[str, aioredis.Redis]]:
    """One client per region's own Redis (short timeouts: a region may be down)."""
    clients = {
        r.name: aioredis.from_url(r.redis_url, socket_timeout=2, socket_connect_timeout=1)
        for r in geo.regions
    }
    try:
        yield clients
    finally:
        for client in clients.values():
            await client.aclose()


async def _sample(
    fleet: Fleet, tracker: Tracker, record: RunRecord, started: float, stop: asyncio.Event
) -> None:
    while True:
        record.samples.append(
            Sample(
                t_s=time.monotonic() - started,
                connected=fleet.connected(),
                submitted=len(tracker.accepted),
                accepted=len(tracker.receipted),
                processed=len(tracker.terminal),
                outbox_depth=fleet.outbox_depth(),
            )
        )
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
