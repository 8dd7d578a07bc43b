"""GEO.md scenario 3: SIGSTOP / SIGKILL races between a bridge's receive and its write.

Each run sends the signal a seeded delay after the order's submit; the agent
then fails over and retries in the other region. A
:class:`fleet.geo.verify.CountMonitor` samples both regions every 50 ms all
along: no order may ever count twice, and after healing each counts once.

The default suite runs two of each race: the signal at once (before the bridge
has X), and a *held* run whose signal lands between the bridge's receive of X
and its write, for certain: the home Redis holds writes (``CLIENT PAUSE
WRITE``) while the bridge is busy writing a blocker order, so X waits in the
bridge, unwritten; the test checks that (the bridge's ``bridge_in_flight`` is
2, no region holds X) just before the signal. ``GEO_SLOW=1`` adds ten runs at
random delays over ~30 ms without the hold, where the signal lands wherever
it falls: before the receive, between, or after the write.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from fleet.geo.stack import GeoStack, Region
from fleet.geo.verify import CountMonitor
from fleet.verify import OrderRef
from schemas import encode
from schemas.names import orders_topic
from testrig.services import pid_alive
from tests.bridge.conftest import Publisher
from tests.helpers import make_order, wait_until

from .conftest import GEO_SLOW, SHARDS, GeoAgent, diagnose, entries, geo_agent, outbox

SEED = int(os.environ.get("GEO_SEED", "1414"))
SLOW_RUNS = 10
# The hold on the home Redis's writes ends by itself after this, should the test not end it.
HOLD_TIMEOUT_MS = 10_000


@dataclass(frozen=True)
class Race:
    """One run: the signal comes ``delay_s`` after X's submit; ``held``: in the write's window."""

    run: int
    delay_s: float
    held: bool

    def __str__(self) -> str:
        return f"{self.run}-{'held' if self.held else 'free'}-{self.delay_s * 1000:.0f}ms"


def races(seed: int) -> list[Race]:
    """At once, then one held run at a seeded delay; GEO_SLOW adds random ones over ~30 ms."""
    out = [Race(0, 0.0, held=False), Race(1, random.Random(seed).uniform(0.1, 0.4), held=True)]
    if GEO_SLOW:
        out += [
            Race(run, random.Random(seed + run).uniform(0.0, 0.03), held=False)
            for run in range(2, 2 + SLOW_RUNS)
        ]
    return out


@pytest.mark.parametrize("race", races(SEED), ids=str)
async def test_sigstop_home_bridge_then_failover_then_sigcont(
    rig: GeoStack, tmp_path: Path, device_id: str, race: Race
) -> None:
    """eu's bridge SIGSTOPped around X; X retried at us into eu's Redis; SIGCONT: count 1."""
    delay_s = race.delay_s
    eu = rig.region("eu")
    assert eu.bridge is not None
    assert eu.bridge.pid is not None
    async with _monitor(rig) as monitor:
        async with geo_agent(rig.agent_regions("eu"), tmp_path / "o.db", device_id=device_id) as a:
            await wait_until(lambda: a.connected and a.region == "eu", what="agent at eu")
            async with _held_writes(rig, eu, device_id, race.held) as hold:
                order_id = await a.submit()
                await asyncio.sleep(delay_s)
                await hold.check_bridge_has_it_unwritten(a.ref(order_id))
                os.kill(eu.bridge.pid, signal.SIGSTOP)
            try:
                await _settled_or_explain(rig, a, order_id, delay_s)
            finally:
                os.kill(eu.bridge.pid, signal.SIGCONT)
            # eu's bridge works through what it held; nothing may add a second entry.
            await asyncio.sleep(1.0)
            ref = a.ref(order_id)
        attempts = outbox(tmp_path / "o.db")[order_id].attempts
    assert monitor.max_count <= 1, monitor.twice
    assert entries(rig, ref) == {"eu": 1, "us": 0}, (delay_s, attempts)
    assert attempts[0] == "eu"
    if race.run == 0 or race.held:
        assert attempts == ("eu", "us"), "the race did not happen: eu answered before SIGSTOP"


@pytest.mark.parametrize("race", races(SEED + 100), ids=str)
async def test_sigkill_bridge_between_receive_and_write_then_retry_elsewhere(
    rig: GeoStack, tmp_path: Path, device_id: str, race: Race
) -> None:
    """us's bridge SIGKILLed around X; X retried at eu into us's Redis; bridge back: count 1."""
    delay_s = race.delay_s
    us = rig.region("us")
    assert us.bridge is not None
    async with _monitor(rig) as monitor:
        async with geo_agent(rig.agent_regions("us"), tmp_path / "o.db", device_id=device_id) as a:
            await wait_until(lambda: a.connected and a.region == "us", what="agent at us")
            async with _held_writes(rig, us, device_id, race.held) as hold:
                order_id = await a.submit()
                await asyncio.sleep(delay_s)
                await hold.check_bridge_has_it_unwritten(a.ref(order_id))
                pid = us.bridge.pid
                us.bridge.kill()
            assert pid is not None
            assert not pid_alive(pid)
            await _settled_or_explain(rig, a, order_id, delay_s)
            us.up()  # the bridge's persistent session hands it X again, if it never acked it
            await asyncio.sleep(1.0)
            ref = a.ref(order_id)
        attempts = outbox(tmp_path / "o.db")[order_id].attempts
    assert monitor.max_count <= 1, monitor.twice
    assert entries(rig, ref) == {"eu": 0, "us": 1}, (delay_s, attempts)
    assert attempts[0] == "us"
    if race.run == 0 or race.held:
        assert attempts == ("us", "eu"), "the race did not happen: us answered before SIGKILL"


async def _settled_or_explain(
    rig: GeoStack, agent: GeoAgent, order_id: str, delay_s: float
) -> None:
    """Wait for X's receipt; on timeout the failure says what every party knows of X."""
    try:
        await wait_until(lambda: agent.settled(order_id), what=f"X settled (delay {delay_s})")
    except pytest.fail.Exception as exc:
        pytest.fail(f"{exc}\n{await diagnose(rig, agent, order_id)}")


class _Hold:
    """A region's Redis holding writes while its bridge writes a blocker (or no hold at all)."""

    def __init__(self, rig: GeoStack, region: Region, active: bool) -> None:
        self.rig = rig
        self.region = region
        self.active = active

    async def check_bridge_has_it_unwritten(self, ref: OrderRef) -> None:
        """Held: the bridge took X (in flight: the blocker and X) and no region holds X."""
        if not self.active:
            return
        assert self.region.bridge is not None
        in_flight = (await _bridge_metrics(self.region.bridge.url))["bridge_in_flight"]
        assert in_flight == 2, f"the bridge holds {in_flight} messages, not the blocker and X"
        assert entries(self.rig, ref) == {"eu": 0, "us": 0}, "X was written before the signal"


@contextlib.asynccontextmanager
async def _held_writes(
    rig: GeoStack, region: Region, device_id: str, active: bool
) -> AsyncIterator[_Hold]:
    """Held: the region's Redis pauses writes and its bridge is stuck writing a blocker order.

    The bridge writes one batch at a time, so an order it receives meanwhile
    waits in its buffer, unwritten, until the block ends (writes resume then).
    """
    hold = _Hold(rig, region, active)
    if not active:
        yield hold
        return
    assert region.bridge is not None
    client = aioredis.from_url(region.redis_url, socket_timeout=5)
    publisher = Publisher(region.mqtt_url)
    try:
        await client.client_pause(HOLD_TIMEOUT_MS, all=False)
        blocker = f"{device_id}-blocker"
        publisher.publish(orders_topic(blocker), encode(make_order(blocker, 0)))
        url = region.bridge.url
        for _ in range(100):
            if (await _bridge_metrics(url))["bridge_in_flight"] == 1:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the bridge never took the blocker order")
        yield hold
    finally:
        await client.client_unpause()
        await client.aclose()
        publisher.close()


async def _bridge_metrics(url: str) -> dict[str, float]:
    """The bridge's unlabelled samples from /metrics."""
    page = await asyncio.to_thread(_get, f"{url}/metrics")
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if not sample.labels
    }


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return str(reply.read().decode())


class _monitor:
    """A CountMonitor sampling every 50 ms for the duration of the block."""

    def __init__(self, rig: GeoStack) -> None:
        self.clients = {
            r.name: aioredis.from_url(r.redis_url, socket_timeout=2) for r in rig.regions
        }
        self.monitor = CountMonitor(self.clients, SHARDS, interval_s=0.05)
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> CountMonitor:
        self.task = asyncio.create_task(self.monitor.run(self.stop))
        return self.monitor

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        if self.task is not None:
            await self.task
        for client in self.clients.values():
            await client.aclose()
