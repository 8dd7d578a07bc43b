"""The geo scenarios' rig: two real regions for the session, geo agents with real outboxes.

One :class:`fleet.geo.stack.GeoStack` (two regions, each Mosquitto + Redis
with the shipped redis.conf + order-bridge + order-pipeline) serves every
test: starting one costs ~20 s on a busy machine. Each test gets it through
``rig``, which restores whatever the test broke (regions down, bridges
stopped, links blackholed) afterwards, and uses its own device ids.

Agents are real :class:`edge_agent.EdgeAgent` objects in geo mode with a file
outbox, observed through the simulator's transport seam (every receipt result
is recorded per order).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
import redis.asyncio as aioredis

from edge_agent import AgentConfig
from fleet.devices import Catalog, SimDevice
from fleet.geo.stack import GeoSettings, GeoStack
from fleet.geo.verify import GeoVerdict, OutboxRow, read_outbox_file, verify_geo
from fleet.stack import DEMO_CATALOG
from fleet.statuses import order_statuses
from fleet.tracker import Tracker
from fleet.verify import OrderRef
from schemas import decode_order
from schemas.names import stream_key
from tests.tools import HAS_FUSE

GEO_SLOW = os.environ.get("GEO_SLOW") == "1"
SHARDS = 2
# Cross-region writes give up fast and the breaker closes again soon: short tests.
BRIDGE_ARGS = (
    "--region-timeout-s", "0.5", "--region-breaker-failures", "3",
    "--region-breaker-open-s", "1",
)  # fmt: skip
CATALOG = Catalog.load(DEMO_CATALOG)


@pytest.fixture(scope="session")
def geo_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GeoStack]:
    """Two regions, eu and us, for the whole session (eu's Redis on a power-cut disk if FUSE)."""
    settings = GeoSettings(
        regions=2, shards=SHARDS, bridge_args=BRIDGE_ARGS,
        redis_powercut=("eu",) if HAS_FUSE else (),
    )  # fmt: skip
    with GeoStack(tmp_path_factory.mktemp("geo"), settings) as rig:
        yield rig


@pytest.fixture
def rig(geo_rig: GeoStack) -> Iterator[GeoStack]:
    """The session rig, whole before the test and repaired after it."""
    dead = [f"{r.name} {p.name}" for r in geo_rig.regions for p in r.servers() if not p.running]
    if dead:
        print(f"geo rig: found dead before the test, restarting: {dead}")
    restore(geo_rig)
    yield geo_rig
    restore(geo_rig)


def restore(rig: GeoStack) -> None:
    """Heal every link, wake stopped bridges, start whatever is down."""
    for name in list(rig.links.links):
        rig.links.reset(name)
        rig.links.heal(name)
    for region in rig.regions:
        if region.bridge is not None and region.bridge.pid is not None:
            os.kill(region.bridge.pid, signal.SIGCONT)
        region.up()
        if region.pipeline is not None and not region.pipeline.running:
            region.pipeline.start()
    for region in rig.regions:
        # A restarted broker forgot the bridge's subscription until it is back.
        assert region.wait_ready(), f"region {region.name} not ready"


def entries(rig: GeoStack, ref: OrderRef) -> dict[str, int]:
    """How many stream entries ``ref`` has in each region."""
    return {name: n[ref] for name, n in all_counts(rig).items()}


def all_counts(rig: GeoStack) -> dict[str, Counter[OrderRef]]:
    """Entries per order in each region's streams (regions that are down count nothing)."""
    out: dict[str, Counter[OrderRef]] = {}
    for region in rig.regions:
        counts: Counter[OrderRef] = Counter()
        if region.redis.running:
            with redis.Redis.from_url(region.redis_url, socket_timeout=5) as client:
                for shard in range(SHARDS):
                    for _id, fields in client.xrange(stream_key(shard)):
                        counts[(fields[b"device_id"].decode(), fields[b"order_id"].decode())] += 1
        out[region.name] = counts
    return out


@dataclass
class Observed(Tracker):
    """The simulator's tracker, plus every receipt result per order in arrival order."""

    results: dict[OrderRef, list[str]] = field(default_factory=dict)

    def receipt(self, ref: OrderRef, result: str) -> None:
        self.results.setdefault(ref, []).append(result)
        super().receipt(ref, result)


class GeoAgent:
    """One real geo-mode agent with a file outbox."""

    def __init__(self, device: SimDevice, tracker: Observed, db: Path) -> None:
        self.device = device
        self.tracker = tracker
        self.db = db
        self.rng = random.Random(device.device_id)

    @property
    def device_id(self) -> str:
        return self.device.device_id

    @property
    def region(self) -> str | None:
        """The region the agent uses now."""
        region: str | None = self.device.agent.publisher.region
        return region

    @property
    def connected(self) -> bool:
        return bool(self.device.agent.publisher.connected)

    def ref(self, order_id: str) -> OrderRef:
        return (self.device_id, order_id)

    async def submit(self) -> str:
        """Submit one order from the demo catalog; its id once the outbox committed it."""
        result = await self.device.agent.submit(CATALOG.order_body(self.rng))
        self.tracker.queued(self.ref(result.order_id), time.monotonic())
        return result.order_id

    async def state(self, order_id: str) -> str | None:
        record = await self.device.agent.get(order_id)
        return None if record is None else record.state

    def settled(self, order_id: str) -> bool:
        """True once the order is settled: a receipt (accepted, duplicate) or a terminal status.

        A terminal status settles it too: the pipeline may finish an order whose
        receipt a SIGSTOPped bridge has not sent yet.
        """
        ref = self.ref(order_id)
        return ref in self.tracker.receipted or ref in self.tracker.terminal

    def attempts(self, order_id: str) -> tuple[str, ...]:
        """The ``attempts`` the last PUBLISH of the order carried."""
        sent = self.tracker.payloads.get(self.ref(order_id))
        return () if sent is None else decode_order(sent[1]).attempts

    def results(self, order_id: str) -> list[str]:
        return self.tracker.results.get(self.ref(order_id), [])


async def diagnose(rig: GeoStack, agent: GeoAgent, order_id: str) -> str:
    """What the agent, the outbox, the streams and the bridges say about one order."""
    publisher = agent.device.agent.publisher
    record = await agent.device.agent.get(order_id)
    geo = publisher.regions
    lines = [
        f"agent: region={agent.region} connected={agent.connected} "
        f"inflight={dict(publisher._window.receipts)} "
        f"until_failover={geo.seconds_until_failover() if geo else None}",
        f"outbox: {record}",
        f"results: {agent.results(order_id)}; last attempts sent: {agent.attempts(order_id)}",
        f"entries: {entries(rig, agent.ref(order_id))}",
    ]
    for region in rig.regions:
        if region.bridge is not None:
            body = await asyncio.to_thread(_readyz, region.bridge.url)
            lines.append(f"{region.name} bridge /readyz: {body[:600]}")
    return "\n".join(lines)


def _readyz(url: str) -> str:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            return str(response.read().decode())
    except OSError as exc:
        return repr(exc)


def agent_config(
    device_id: str, regions: Sequence[tuple[str, str]], db: Path, **overrides: Any
) -> AgentConfig:
    """A geo agent's settings, short timers for tests."""
    settings: dict[str, Any] = {
        "device_id": device_id,
        "mqtt_url": regions[0][1],
        "region": tuple(f"{name}={url}" for name, url in regions),
        "db": str(db),
        "http_enabled": False,
        "receipt_timeout_s": 2.0,
        "reconnect_min_s": 0.1,
        "reconnect_max_s": 0.5,
        "poll_interval_s": 0.1,
        "failover_after_s": 1.5,
        "failback_probe_s": 60.0,
        "pending_retry_min_s": 0.3,
        "pending_retry_max_s": 1.0,
        "status_query_delay_s": 2.0,
        "max_inflight": 20,
    }
    settings.update(overrides)
    return msgspec.convert(settings, AgentConfig)


@contextlib.asynccontextmanager
async def geo_agent(
    regions: Sequence[tuple[str, str]], db: Path, *, device_id: str, **overrides: Any
) -> AsyncIterator[GeoAgent]:
    """Run a geo agent (regions home first) until the block ends."""
    tracker = Observed()
    device = SimDevice(agent_config(device_id, regions, db, **overrides), tracker)
    async with device.agent:
        yield GeoAgent(device, tracker, db)


async def verify_rig(
    rig: GeoStack,
    accepted: Sequence[OrderRef],
    rows: dict[OrderRef, OutboxRow],
    *,
    statuses: bool = False,
) -> GeoVerdict:
    """:func:`fleet.geo.verify.verify_geo` over the rig's regions."""
    clients = {r.name: aioredis.from_url(r.redis_url, socket_timeout=5) for r in rig.regions}
    try:
        return await verify_geo(
            clients, accepted, rows, shards=SHARDS,
            statuses=order_statuses if statuses else None, pipeline_writes=statuses,
        )  # fmt: skip
    finally:
        for client in clients.values():
            await client.aclose()


def outbox(db: Path) -> dict[str, OutboxRow]:
    """The agent's outbox on disk (read after the agent closed it)."""
    return read_outbox_file(db)
