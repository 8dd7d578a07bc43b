"""GEO.md scenario 3: SIGSTOP / SIGKILL races between a bridge's receive and its write.

Each run picks a random delay between the order's submit and the signal, so the
signal lands before the bridge received the order, between receive and write,
or after the write; the agent then fails over and retries in the other
region. A :class:`fleet.geo_verify.CountMonitor` samples both regions every
50 ms all along: no order may ever count twice, and after healing each counts once.

Short form by default (one run of each race, the signal at once); ``GEO_SLOW=1`` runs many.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from fleet.geo_stack import GeoStack
from fleet.geo_verify import CountMonitor
from fleet.services import pid_alive
from tests.helpers import wait_until

from .conftest import GEO_SLOW, SHARDS, GeoAgent, diagnose, entries, geo_agent, outbox

RUNS = 12 if GEO_SLOW else 1
SEED = int(os.environ.get("GEO_SEED", "1414"))


@pytest.mark.parametrize("run", range(RUNS))
async def test_sigstop_home_bridge_then_failover_then_sigcont(
    rig: GeoStack, tmp_path: Path, device_id: str, run: int
) -> None:
    """eu's bridge SIGSTOPped around X; X retried at us into eu's Redis; SIGCONT: count 1."""
    delay_s = _delay(SEED + run, run)
    eu = rig.region("eu")
    assert eu.bridge is not None
    assert eu.bridge.pid is not None
    async with _monitor(rig) as monitor:
        async with geo_agent(rig.agent_regions("eu"), tmp_path / "o.db", device_id=device_id) as a:
            await wait_until(lambda: a.connected and a.region == "eu", what="agent at eu")
            order_id = await a.submit()
            await asyncio.sleep(delay_s)
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
    if run == 0:
        assert attempts == ("eu", "us"), "the race did not happen: eu answered before SIGSTOP"


@pytest.mark.parametrize("run", range(RUNS))
async def test_sigkill_bridge_between_receive_and_write_then_retry_elsewhere(
    rig: GeoStack, tmp_path: Path, device_id: str, run: int
) -> None:
    """us's bridge SIGKILLed around X; X retried at eu into us's Redis; bridge back: count 1."""
    delay_s = _delay(SEED + 100 + run, run)
    us = rig.region("us")
    assert us.bridge is not None
    async with _monitor(rig) as monitor:
        async with geo_agent(rig.agent_regions("us"), tmp_path / "o.db", device_id=device_id) as a:
            await wait_until(lambda: a.connected and a.region == "us", what="agent at us")
            order_id = await a.submit()
            await asyncio.sleep(delay_s)
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
    if run == 0:
        assert attempts == ("us", "eu"), "the race did not happen: us answered before SIGKILL"


async def _settled_or_explain(
    rig: GeoStack, agent: GeoAgent, order_id: str, delay_s: float
) -> None:
    """Wait for X's receipt; on timeout the failure says what every party knows of X."""
    try:
        await wait_until(lambda: agent.settled(order_id), what=f"X settled (delay {delay_s})")
    except pytest.fail.Exception as exc:
        pytest.fail(f"{exc}\n{await diagnose(rig, agent, order_id)}")


def _delay(seed: int, run: int) -> float:
    """Run 0 signals at once (before the bridge got X); later runs land anywhere in ~30 ms."""
    return 0.0 if run == 0 else random.Random(seed).uniform(0.0, 0.03)


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
