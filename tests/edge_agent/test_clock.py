"""Wall-clock jumps: no order is lost or stalled, and none goes out after its dedup horizon."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from edge_agent import AgentConfig, EdgeAgent
from edge_agent._clock import AgentClock
from schemas import names
from servicekit.clock import now_ms
from tests.helpers import wait_until

from .bridge_double import BridgeDouble
from .conftest import order_body

DAY_MS = 24 * 3600 * 1000


class JumpingTime:
    """Real time plus offsets a test moves: the wall clock jumps, the monotonic one advances.

    ``frozen``: the monotonic clock stands still, so agent time passes only when the
    test moves ``monotonic_offset_s``; no receipt times out because the machine is slow.
    """

    def __init__(self, *, frozen: bool = False) -> None:
        self.wall_offset_ms = 0
        self.monotonic_offset_s = 0.0
        self._frozen_at = time.monotonic() if frozen else None

    def monotonic_s(self) -> float:
        now = time.monotonic() if self._frozen_at is None else self._frozen_at
        return now + self.monotonic_offset_s

    def clock(self) -> AgentClock:
        """A fresh agent clock (as a restarted process has) reading these offsets."""
        return AgentClock(
            wall_ms=lambda: now_ms() + self.wall_offset_ms, monotonic_s=self.monotonic_s
        )


def _swallow_first(_order_id: str, count: int) -> tuple[str, str | None] | None:
    return None if count == 1 else ("accepted", None)


def test_the_horizon_is_below_the_bridge_dedup_ttl() -> None:
    """The default resend horizon ends before the bridge forgets its dedup markers."""
    config = AgentConfig(device_id="kiosk-1")
    assert config.resend_max_age_s < names.DEDUP_TTL_S


@pytest.mark.parametrize("jump_days", [3, -3])
@pytest.mark.parametrize("restart", [False, True], ids=["running", "restarted"])
async def test_a_wall_clock_jump_neither_loses_nor_stalls_an_order(
    make_config: Callable[..., AgentConfig], mqtt_url: str, jump_days: int, restart: bool
) -> None:
    """After a ±3-day jump (running, or while off) the unreceipted order is resent and lands."""
    # Agent time moves only when the test moves it: on a busy machine a late receipt
    # would otherwise time out and be resent a third time, legitimately.
    time_ = JumpingTime(frozen=True)
    config = make_config(
        http_enabled=False, receipt_timeout_s=0.5, prune_interval_s=0.2, storage_retry_s=0.1
    )
    with BridgeDouble(mqtt_url, _swallow_first) as double:
        async with EdgeAgent(config, clock=time_.clock()) as agent:
            await agent.submit(order_body("jump-000001"))
            await wait_until(_seen(double, "jump-000001", 1), 20, "first send")
            time_.wall_offset_ms += jump_days * DAY_MS
            if not restart:
                # The receipt is overdue by the agent clock: the resend is due now.
                time_.monotonic_offset_s += config.receipt_timeout_s + 0.001
                await _resent_once_and_accepted(agent, double)
                return
        # A reconnect sends every unreceipted order again.
        async with EdgeAgent(config, clock=time_.clock()) as agent:
            await _resent_once_and_accepted(agent, double)


async def _resent_once_and_accepted(agent: EdgeAgent, double: BridgeDouble) -> None:
    async def accepted() -> bool:
        rec = await agent.get("jump-000001")
        return rec is not None and rec.state == "accepted"

    await wait_until(accepted, 20, "accepted after the jump")
    await asyncio.sleep(0.5)  # maintenance rounds: expire ran and left it alone
    assert agent.expired_unreceipted == 0
    # Resent once, on time, not stalled; with agent time standing still since the
    # resend, a third send could only be a bug, not a slow receipt.
    assert double.seen["jump-000001"] == 2


async def test_no_send_past_the_horizon_when_the_wall_clock_says_young(
    make_config: Callable[..., AgentConfig], mqtt_url: str
) -> None:
    """6 days of monotonic time with the wall set back 3 days: expired, never sent again."""
    time_ = JumpingTime()
    config = make_config(
        http_enabled=False, receipt_timeout_s=30, prune_interval_s=0.2, storage_retry_s=0.1
    )
    with BridgeDouble(mqtt_url, lambda _oid, _n: None) as double:
        async with EdgeAgent(config, clock=time_.clock()) as agent:
            await agent.submit(order_body("horizon-00001"))
            await wait_until(_seen(double, "horizon-00001", 1), 20, "first send")
            time_.monotonic_offset_s += config.resend_max_age_s + 60
            time_.wall_offset_ms -= 3 * DAY_MS  # by the wall clock the order is from the future

            async def expired() -> bool:
                rec = await agent.get("horizon-00001")
                return rec is not None and rec.reason == "unreceipted_expired"

            await wait_until(expired, 20, "expired at the horizon")
            await asyncio.sleep(1.0)
            assert double.seen["horizon-00001"] == 1  # the receipt timeout passed; no resend
            assert agent.expired_unreceipted == 1


async def test_downtime_is_measured_by_the_wall_clock_and_errs_towards_no_resend(
    make_config: Callable[..., AgentConfig], mqtt_url: str
) -> None:
    """Off for 7 days by the wall clock (monotonic restarts): the order is not sent again."""
    time_ = JumpingTime()
    config = make_config(http_enabled=False, prune_interval_s=0.2, storage_retry_s=0.1)
    with BridgeDouble(mqtt_url, lambda _oid, _n: None) as double:
        async with EdgeAgent(config, clock=time_.clock()) as agent:
            await agent.submit(order_body("offline-0001"))
            await wait_until(_seen(double, "offline-0001", 1), 20, "first send")
            await agent.outbox.flush()
        time_.wall_offset_ms += 7 * DAY_MS
        time_.monotonic_offset_s = -1e6  # a new boot: the monotonic clock starts over
        async with EdgeAgent(config, clock=time_.clock()) as agent:

            async def expired() -> bool:
                rec = await agent.get("offline-0001")
                return rec is not None and rec.reason == "unreceipted_expired"

            await wait_until(expired, 20, "expired after a week off")
            assert double.seen["offline-0001"] == 1


def _seen(double: BridgeDouble, order_id: str, count: int) -> Callable[[], asyncio.Future[bool]]:
    async def check() -> bool:
        return double.seen[order_id] >= count

    return check  # type: ignore[return-value]
