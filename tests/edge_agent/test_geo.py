"""Geo mode, agent side: failover, failback, `attempts`, `pending`, single-region compatibility.

Real Mosquitto brokers, one per region; the bridges are doubles of our own
bridge (``geo_rig.RegionBridge``) that record what each order carried.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import msgspec
import pytest

from edge_agent import AgentConfig, EdgeAgent
from edge_agent._records import NewOrder
from edge_agent._store import Store
from edge_agent.errors import StorageError
from edge_agent.transport import Transport, TransportHandlers, TransportSettings, default_transport
from testrig.servers import MosquittoProcess, port_is_open
from tests.helpers import wait_until

from .bridge_double import accept_all
from .conftest import order_body
from .geo_rig import RegionBridge, never_answer
from .test_clock import JumpingTime


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
    made: list[TransportSettings] = []

    def factory(settings: TransportSettings, handlers: TransportHandlers) -> Transport:
        made.append(settings)
        return default_transport(settings, handlers)

    with RegionBridge("home", home.url) as at_home, RegionBridge("b", other.url) as at_b:
        async with EdgeAgent(config, transport_factory=factory) as agent:
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
    # One fresh transport per region switch, the latest always the one in use; the
    # home probes never came from the agent's factory (nothing wrapping it sees them).
    assert [str(s.url) for s in made] == [str(home.url), str(other.url), str(home.url)]
    assert all(s.subscriptions for s in made)


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
                record = await agent.get(oid)
                assert record is not None
                assert record.regions == ("home", "b")  # GET /v1/orders/{id} shows it
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
        http_enabled=True,
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
            metrics_url = f"http://127.0.0.1:{agent.http_port}/metrics"
            async with aiohttp.ClientSession() as http, http.get(metrics_url) as resp:
                assert "edge_orders_awaiting_authority 1.0" in await resp.text()
            await wait_accepted(agent, ["geo-pending-1"])
            assert at_home.seen["geo-pending-1"] == 4
            # Every resend to the same region carried the same bytes (no dedup conflict).
            assert len(set(at_home.payloads["geo-pending-1"])) == 1
            assert at_home.carried("geo-pending-1")[0] == ("home",)
            assert b'edge_receipts_total{result="pending"} 3.0' in agent.metrics.render()
            assert (await agent.health()).awaiting_authority == 0
            assert (await agent.health()).region == "home"  # pending is an answer: no failover


async def test_an_earlier_bridges_unknown_region_rejection_keeps_the_order(
    make_config: Callable[..., AgentConfig],
    mosquitto_factory: Callable[..., MosquittoProcess],
) -> None:
    """A bridge of an earlier release answers `rejected` (unknown_region) while it lacks the
    home region: the agent keeps the order as it does `pending`, and it lands once it knows."""
    home = mosquitto_factory()

    def unknown_twice(_order_id: str, count: int) -> tuple[str, str | None]:
        return ("rejected", "unknown_region") if count <= 2 else ("accepted", None)

    config = geo_config(
        make_config, ("home", home.url), pending_retry_min_s=0.3, pending_retry_max_s=0.6
    )
    with RegionBridge("home", home.url, unknown_twice) as at_home:
        async with EdgeAgent(config) as agent:
            await agent.submit(order_body("geo-unknown-1"))

            async def answered() -> bool:
                return at_home.seen["geo-unknown-1"] >= 1

            await wait_until(answered, 10, "a first unknown_region rejection")
            await asyncio.sleep(0.1)
            record = await agent.get("geo-unknown-1")
            assert record is not None
            assert (record.state, record.reason) == ("sent", "unknown_region")
            assert (await agent.health()).awaiting_unknown_region == 1
            await wait_accepted(agent, ["geo-unknown-1"])
            assert at_home.seen["geo-unknown-1"] == 3
            assert b'edge_receipts_total{result="rejected"} 2.0' in agent.metrics.render()


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

    overrides: dict[str, object] = {"receipt_timeout_s": 0.5}
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
            url = f"http://127.0.0.1:{agent.http_port}/v1/orders/geo-compat-1"
            async with aiohttp.ClientSession() as http, http.get(url) as resp:
                shown = await resp.json()
    payloads = bridge.payloads["geo-compat-1"]
    assert len(payloads) == 2
    assert payloads[0] == payloads[1]
    if regions:
        assert bridge.carried("geo-compat-1") == [("home",), ("home",)]
        assert stored[1] == "home"
        assert (health.region, health.failovers) == ("home", 0)
        assert shown["regions"] == ["home"]
    else:
        assert payloads[0] == stored[0]  # exactly the bytes committed at intake
        assert "attempts" not in msgspec.msgpack.decode(payloads[0])
        assert stored[1] == ""
        assert health.region is None
        assert "regions" not in shown  # the v1 answer, unchanged
        assert shown["state"] == "accepted"


async def test_no_publish_to_a_region_until_its_name_is_committed(
    make_config: Callable[..., AgentConfig],
    mosquitto_factory: Callable[..., MosquittoProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The attempts commit fails (disk full): nothing is published; once it works, it is."""
    home, other = mosquitto_factory(), mosquitto_factory()
    config = geo_config(make_config, ("home", home.url), ("b", other.url))
    with RegionBridge("home", home.url) as at_home:
        async with EdgeAgent(config) as agent:
            real_add_region = agent.outbox.add_region
            refused: list[tuple[list[str], str]] = []

            async def disk_full(order_ids: list[str], region: str) -> None:
                refused.append((order_ids, region))
                raise StorageError("database or disk is full", reason="disk_full")

            monkeypatch.setattr(agent.outbox, "add_region", disk_full)
            await agent.submit(order_body("geo-commit-1"))

            async def tried() -> bool:
                return len(refused) >= 2  # it retries on a fresh connection

            await wait_until(tried, 10, "the attempts commit tried")
            assert refused[0] == (["geo-commit-1"], "home")
            assert "geo-commit-1" not in at_home.ids()
            assert await agent.outbox.regions_of("geo-commit-1") == ()

            monkeypatch.setattr(agent.outbox, "add_region", real_add_region)
            await wait_accepted(agent, ["geo-commit-1"])
            assert set(at_home.carried("geo-commit-1")) == {("home",)}
            assert await agent.outbox.regions_of("geo-commit-1") == ("home",)


async def test_status_after_failover_is_recovered_at_home(
    device_id: str,
    make_config: Callable[..., AgentConfig],
    mosquitto_factory: Callable[..., MosquittoProcess],
) -> None:
    """A status home's pipeline published while the device was in B (and home's broker lost)
    reaches the device by status query once it is back home.

    Statuses come from the authority region's pipeline, on that region's broker only.
    """
    home = mosquitto_factory(persistence=False)
    other = mosquitto_factory()
    config = geo_config(
        make_config,
        ("home", home.url),
        ("b", other.url),
        failback_probe_s=0.3,
        status_query_delay_s=0.4,
        status_query_max_interval_s=0.8,
    )
    with (
        RegionBridge("home", home.url, answer_queries=True) as at_home,
        RegionBridge("b", other.url) as at_b,
    ):
        async with EdgeAgent(config) as agent:
            await agent.submit(order_body("geo-status-1"))
            await wait_accepted(agent, ["geo-status-1"])
            at_home.answer_queries = False  # home's pipeline has not processed it yet

            await asyncio.to_thread(home.kill)
            assert not port_is_open(home.port)

            async def in_b() -> bool:
                return (await agent.health()).region == "b"

            await wait_until(in_b, 15, "failover to b")

            async def asked_b() -> bool:
                return "geo-status-1" in at_b.queried_ids()

            # Queries go to the connected region; B's pipeline does not own the order.
            await wait_until(asked_b, 15, "a status query in b")
            record = await agent.get("geo-status-1")
            assert record is not None
            assert record.status is None

            await asyncio.to_thread(home.start)  # no persistence: nothing queued survived
            assert await asyncio.to_thread(at_home.subscribed.wait, 10)
            at_home.answer_queries = True  # home's pipeline now has a terminal status

            async def fulfilled() -> bool:
                rec = await agent.get("geo-status-1")
                return rec is not None and rec.status == "fulfilled"

            await wait_until(fulfilled, 20, "the status recovered at home")
            assert (await agent.health()).region == "home"
            assert "geo-status-1" in at_home.queried_ids()


def test_attempts_column_only_grows_and_keeps_the_first_send_time(tmp_path: Path) -> None:
    """add_region appends new names once, in order, and never moves the first-send time."""
    store = Store(str(tmp_path / "o.db"), max_rows=100, max_bytes=10**6)
    assert store.open() is None
    try:
        store.write([NewOrder("geo-store-1", 0, b"x")], [])
        store.add_region(["geo-store-1"], "home", 1_000)
        store.add_region(["geo-store-1"], "b", 5_000)
        store.add_region(["geo-store-1"], "home", 9_000)
        store.add_region(["geo-store-1"], "ho", 9_500)  # a prefix of a name is another name
        assert store.regions_of("geo-store-1") == ("home", "b", "ho")
        first_sent = store.conn.execute(
            "SELECT first_sent_clock_ms FROM orders WHERE order_id = 'geo-store-1'"
        ).fetchone()[0]
        assert first_sent == 1_000  # the dedup horizon counts from before the first PUBLISH
    finally:
        store.close()


async def test_pending_retries_stop_at_the_dedup_horizon(
    make_config: Callable[..., AgentConfig],
    mosquitto_factory: Callable[..., MosquittoProcess],
) -> None:
    """An order answered `pending` for ever is not resent past resend_max_age_s: alarmed instead."""
    home, other = mosquitto_factory(), mosquitto_factory()
    time_ = JumpingTime()
    config = geo_config(
        make_config,
        ("home", home.url),
        ("b", other.url),
        pending_retry_min_s=0.2,
        pending_retry_max_s=0.2,
        prune_interval_s=0.2,
        storage_retry_s=0.1,
    )

    def always_pending(_order_id: str, _count: int) -> tuple[str, str | None]:
        return ("pending", "authority_unreachable")

    with RegionBridge("home", home.url, always_pending) as at_home:
        async with EdgeAgent(config, clock=time_.clock()) as agent:
            await agent.submit(order_body("geo-horizon-1"))

            async def retried() -> bool:
                return at_home.seen["geo-horizon-1"] >= 2

            await wait_until(retried, 10, "pending retries")
            time_.monotonic_offset_s += config.resend_max_age_s + 60

            async def expired() -> bool:
                rec = await agent.get("geo-horizon-1")
                return rec is not None and rec.reason == "unreceipted_expired"

            await wait_until(expired, 20, "expired at the horizon")
            sends = at_home.seen["geo-horizon-1"]
            await asyncio.sleep(1.0)  # five pending-retry intervals
            assert at_home.seen["geo-horizon-1"] == sends
            assert agent.expired_unreceipted == 1
            assert (await agent.health()).awaiting_authority == 0  # settled as rejected


async def test_home_with_two_brokers_uses_the_second_before_another_region(
    make_config: Callable[..., AgentConfig],
    mosquitto_factory: Callable[..., MosquittoProcess],
) -> None:
    """Home's first broker killed: the agent moves to home's second broker, not to region b;
    the orders still carry attempts [home], and the move counts as kind=broker."""
    home_a, home_b, other = mosquitto_factory(), mosquitto_factory(), mosquitto_factory()
    config = geo_config(make_config, ("home", home_a.url), ("home", home_b.url), ("b", other.url))
    with (
        RegionBridge("home", home_a.url) as at_a,
        RegionBridge("home", home_b.url) as at_home_b,
        RegionBridge("b", other.url) as at_b,
    ):
        async with EdgeAgent(config) as agent:
            first = [f"brokers-first-{i:03d}" for i in range(3)]
            await submit_all(agent, first)
            await wait_accepted(agent, first)
            assert at_a.ids() >= set(first)

            await asyncio.to_thread(home_a.kill)
            assert not port_is_open(home_a.port)  # the fault really happened
            second = [f"brokers-second-{i:03d}" for i in range(3)]
            await submit_all(agent, second)
            await wait_accepted(agent, second)
            assert [set(at_home_b.carried(oid)) for oid in second] == [{("home",)}] * 3
            assert not at_b.ids()  # region b never saw an order
            health = await agent.health()
            assert (health.region, health.failovers) == ("home", 0)
            assert b'edge_region_switches_total{kind="broker"} 1.0' in agent.metrics.render()
