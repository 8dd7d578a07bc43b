"""fleet-sim's durability chaos kinds, one short run each: 0 lost, 0 duplicated.

``redis-powercut`` cuts the Redis host's power (its files on testrig.powercut),
``agent-powercut`` the power of the devices with file outboxes, ``redis-oom``
lowers ``maxmemory`` below use for a while, ``clock-skew`` moves the devices'
wall clock by days. Each run proves its fault happened.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fleet.sim import AGENT_POWERCUT_DEVICES, SimOptions, SimResult, run
from fleet.stack import Stack, StackSettings
from tests.powercut.conftest import needs_fuse

pytestmark = needs_fuse  # the module's stack keeps Redis on the power-cut filesystem

DEVICES = 100
RATE = 40.0
DURATION_S = 8.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A local stack whose Redis keeps its files on a power-cut filesystem."""
    settings = StackSettings(shards=4, redis_powercut=True)
    with Stack(tmp_path_factory.mktemp("stack"), settings) as running:
        yield running


async def _run(stack: Stack, chaos: str) -> SimResult:
    options = SimOptions(
        devices=DEVICES, rate=RATE, duration_s=DURATION_S, shards=4, chaos=chaos,
        settle_timeout_s=90, receipt_timeout_s=3.0, status_wait_s=20,
    )  # fmt: skip
    result = await run(options, stack)
    v = result.verdict
    assert v.checked > RATE * DURATION_S * 0.5, "too few orders to prove anything"
    assert result.settled, "the run did not reach quiescence"
    assert (v.lost, v.duplicated, v.stuck) == ([], {}, [])
    assert v.unheard == []
    assert len(result.record.events) == len(chaos.split(","))
    return result


async def test_redis_power_cut(stack: Stack) -> None:
    """Redis host power cut mid-load (appendfsync always): nothing lost, nothing doubled."""
    before = stack.redis.pid
    result = await _run(stack, "3:redis-powercut")
    detail = result.record.events[0][1]
    assert f"pid {before} gone" in detail
    assert stack.redis.pid != before


async def test_agent_power_cut(stack: Stack) -> None:
    """Devices with file outboxes lose power mid-load and restart on what was synced."""
    result = await _run(stack, "3:agent-powercut,5:agent-powercut")
    for _, detail in result.record.events:
        assert f"({AGENT_POWERCUT_DEVICES} agents restarted" in detail


async def test_redis_out_of_memory(stack: Stack) -> None:
    """maxmemory below use for 3 s: writes answer OOM, then everything lands once."""
    result = await _run(stack, "3:redis-oom=3")
    assert "writes refused: OOM" in result.record.events[0][1]


@pytest.mark.parametrize("days", [3, -3])
async def test_device_clock_jumps(stack: Stack, days: int) -> None:
    """The devices' wall clock jumps ±3 days mid-load: no order lost, none sent twice."""
    result = await _run(stack, f"3:clock-skew={days * 86_400}")
    assert f"{days * 86_400:+,} s off" in result.record.events[0][1]
