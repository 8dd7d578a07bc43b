"""Geo mode, agent side: failover, failback, `attempts`, `pending`, single-region compatibility.

Real Mosquitto brokers, one per region; the bridges are doubles of our own
bridge (``geo_rig.RegionBridge``) that record what each order carried.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec
import pytest

from edge_agent import AgentConfig, EdgeAgent
from fleet.servers import MosquittoProcess, port_is_open

from .bridge_double import accept_all
from .conftest import order_body, wait_until
from .geo_rig import RegionBridge, never_answer


async def submit_all(agent: EdgeAgent, order_ids: list[str]) -> None:
    for order_id in order_ids:
        await agent.submit(order_body(order_id))


async def wait_accepted(agent: EdgeAgent, order_ids: list[str], timeout_s: float = 20.0) -> None:
    async def accepted() -> bool:
        for order_id in order_ids:
            record = await agent.get(order_id)
            if record is None or record.state != "accepted":
                return False
        return True

    await wait_until(accepted, timeout_s, f"{len(order_ids)} orders accepted")


def geo_config(
    make_config: Callable[..., AgentConfig], *regions: tuple[str, str], **overrides: object
) -> AgentConfig:
    settings: dict[str, object] = {
        "http_enabled": False,
        "region": tuple(f"{name}={url}" for name, url in regions),
        "failover_after_s": 1.0,
        "failback_probe_s": 60.0,
        **overrides,
    }
    return make_config(**settings)


async def test_fails_over_when_home_dies_and_back_when_it_returns(
    make_config: Callable[..., AgentConfig],
    mosquitto_factory: Callable[..., MosquittoProcess],
) -> None:
    """Home's broker killed: new orders flow in B owned by B; home back: the agent goes home."""
    home, other = mosquitto_factory(), mosquitto_factory()
    config = geo_config(make_config, ("home", home.url), ("b", other.url), failback_probe_s=0.3)
    with RegionBridge("home", home.url) as at_home, RegionBridge("b", other.url) as at_b:
        async with EdgeAgent(config) as agent:
            first = [f"geo-first-{i:03d}" for i in range(5)]
            await submit_all(agent, first)
            await wait_accepted(agent, first)
            # (A receipt may beat the commit of its Sent row: a resend then, same bytes.)
            assert [set(at_home.carried(oid)) for oid in first] == [{("home",)}] * 5
            assert (await agent.health()).region == "home"

            await asyncio.to_thread(home.kill)
            assert not port_is_open(home.port)  # the fault really happened
            killed_at = time.monotonic()
            second = [f"geo-second-{i:03d}" for i in range(5)]
            await submit_all(agent, second)
            await wait_accepted(agent, second)
            took_s = time.monotonic() - killed_at
            # Published first to B, so B owns them; committed on disk as such.
            assert [set(at_b.carried(oid)) for oid in second] == [{("b",)}] * 5
            assert not at_home.ids() & set(second)
            assert [await agent.outbox.regions_of(oid) for oid in second] == [("b",)] * 5
            health = await agent.health()
            assert (health.region, health.failovers, health.failbacks) == ("b", 1, 0)
            # failover_after_s is 1 s; generous slack for a loaded machine.
            assert took_s < 10, f"failover took {took_s:.1f} s"

            await asyncio.to_thread(home.start)
            assert await asyncio.to_thread(at_home.subscribed.wait, 10)

            async def back_home() -> bool:
                return (await agent.health()).region == "home"

            await wait_until(back_home, 15, "failback to home")
            third = [f"geo-third-{i:03d}" for i in range(5)]
            await submit_all(agent, third)
            await wait_accepted(agent, third)
            assert [set(at_home.carried(oid)) for oid in third] == [{("home",)}] * 5
            assert not at_b.ids() & set(third)
            health = await agent.health()
            assert (health.failovers, health.failbacks) == (1, 1)
            assert b'edge_region_switches_total{kind="failback"} 1.0' in agent.metrics.render()


async def test_no_receipts_fails_over_and_resends_with_both_regions(
    make_config: Callable[..., AgentConfig],
    mosquitto_factory: Callable[..., MosquittoProcess],
) -> None:
    """Home's bridge takes orders but never answers: the agent moves on; attempts = [home, b]."""
    home, other = mosquitto_factory(), mosquitto_factory()
    config = geo_config(make_config, ("home", home.url), ("b", other.url), receipt_timeout_s=30)
    ids = [f"geo-stall-{i:03d}" for i in range(4)]
    with (
        RegionBridge("home", home.url, never_answer) as at_home,
        RegionBridge("b", other.url) as at_b,
    ):
        async with EdgeAgent(config) as agent:
            await submit_all(agent, ids)
            assert not await asyncio.to_thread(at_home.wait_for, set(ids), 10)
            assert (await agent.health()).region == "home"  # connected, waiting
            await wait_accepted(agent, ids)
            for oid in ids:
                assert set(at_home.carried(oid)) == {("home",)}
                assert set(at_b.carried(oid)) == {("home", "b")}  # home stays the authority
                assert await agent.outbox.regions_of(oid) == ("home", "b")
            assert port_is_open(home.port)  # home's broker never went down: a stall, not a loss
            assert (await agent.health()).region == "b"


async def test_pending_keeps_the_order_and_retries_with_backoff(
    make_config: Callable[..., AgentConfig],
    mosquitto_factory: Callable[..., MosquittoProcess],
) -> None:
    """`pending` (authority unreachable) settles nothing; the order is resent until it lands."""
    home, other = mosquitto_factory(), mosquitto_factory()

    def pending_thrice(_order_id: str, count: int) -> tuple[str, str | None]:
        return ("pending", "authority_unreachable") if count <= 3 else ("accepted", None)

    config = geo_config(
        make_config,
        ("home", home.url),
        ("b", other.url),
        pending_retry_min_s=0.3,
        pending_retry_max_s=0.6,
    )
    with RegionBridge("home", home.url, pending_thrice) as at_home:
        async with EdgeAgent(config) as agent:
            await agent.submit(order_body("geo-pending-1"))

            async def answered_pending() -> bool:
                return at_home.seen["geo-pending-1"] >= 1

            await wait_until(answered_pending, 10, "a first pending")
            await asyncio.sleep(0.1)
            record = await agent.get("geo-pending-1")
            assert record is not None
            assert record.state == "sent"  # kept, not settled
            health = await agent.health()
            assert health.awaiting_authority == 1
            await wait_accepted(agent, ["geo-pending-1"])
            assert at_home.seen["geo-pending-1"] == 4
            # Every resend to the same region carried the same bytes (no dedup conflict).
            assert len(set(at_home.payloads["geo-pending-1"])) == 1
            assert at_home.carried("geo-pending-1")[0] == ("home",)
            assert b'edge_receipts_total{result="pending"} 3.0' in agent.metrics.render()
            assert (await agent.health()).awaiting_authority == 0
            assert (await agent.health()).region == "home"  # pending is an answer: no failover


@pytest.mark.parametrize("regions", [0, 1])
async def test_single_region_sends_stable_bytes(
    regions: int,
    make_config: Callable[..., AgentConfig],
    mosquitto_factory: Callable[..., MosquittoProcess],
) -> None:
    """No --region: today's bytes, no attempts key. One region: attempts=[home], never growing.

    Either way a resend to the same single-region bridge carries identical bytes,
    so its payload-digest dedup answers `duplicate`, never `conflict`.
    """
    broker = mosquitto_factory()

    def second_send_only(_order_id: str, count: int) -> tuple[str, str | None] | None:
        return None if count == 1 else accept_all(_order_id, count)

    overrides: dict[str, object] = {"http_enabled": False, "receipt_timeout_s": 0.5}
    if regions:
        overrides["region"] = (f"home={broker.url}",)
        overrides["failover_after_s"] = 0.2  # one region: nowhere to go, never switches
    config = make_config(mqtt_url=broker.url, **overrides)
    with RegionBridge("home", broker.url, second_send_only) as bridge:
        async with EdgeAgent(config) as agent:
            await agent.submit(order_body("geo-compat-1"))
            await wait_accepted(agent, ["geo-compat-1"])
            stored = agent.outbox.store.conn.execute(
                "SELECT payload, regions FROM orders WHERE order_id = 'geo-compat-1'"
            ).fetchone()
            health = await agent.health()
    payloads = bridge.payloads["geo-compat-1"]
    assert len(payloads) == 2
    assert payloads[0] == payloads[1]
    if regions:
        assert bridge.carried("geo-compat-1") == [("home",), ("home",)]
        assert stored[1] == "home"
        assert (health.region, health.failovers) == ("home", 0)
    else:
        assert payloads[0] == stored[0]  # exactly the bytes committed at intake
        assert "attempts" not in msgspec.msgpack.decode(payloads[0])
        assert stored[1] == ""
        assert health.region is None
