"""GEO.md scenarios 1 and 2: a lost receipt then failover; a region down while orders flow."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from fleet.geo.links import LinkHost
from fleet.geo.stack import GeoStack
from testrig.servers import free_port
from testrig.services import pid_alive
from tests.helpers import wait_until

from .conftest import GeoAgent, entries, geo_agent, outbox, verify_rig


async def test_lost_receipt_then_failover_counts_the_order_once(
    rig: GeoStack, tmp_path: Path, device_id: str
) -> None:
    """eu wrote X but its receipt is lost and eu's broker dies; us resends X into eu's Redis."""
    eu, us = rig.region("eu"), rig.region("us")
    with LinkHost() as host:
        port = free_port()
        host.add("device>eu", ("127.0.0.1", eu.broker.port), port)
        regions = [("eu", f"mqtt://127.0.0.1:{port}"), ("us", us.mqtt_url)]
        async with geo_agent(regions, tmp_path / "outbox.db", device_id=device_id) as agent:
            await wait_until(lambda: agent.connected and agent.region == "eu", what="eu")
            # Nothing comes back from eu from now on: no PUBACK, no receipt.
            host.blackhole("device>eu", up=False, down=True)
            order_id = await agent.submit()
            ref = agent.ref(order_id)
            await wait_until(lambda: entries(rig, ref)["eu"] == 1, what="X in eu's streams")
            assert agent.results(order_id) == [], "the receipt was not held back"
            broker_pid = eu.broker.pid
            eu.broker.kill()
            assert broker_pid is not None
            assert not pid_alive(broker_pid)
            host.reset("device>eu")  # the device's connection to eu dies with the broker
            host.heal("device>eu")
            await wait_until(lambda: agent.settled(order_id), what="X settled through us")
            assert agent.region == "us"
            assert agent.results(order_id) == ["duplicate"], "us did not answer from eu's Redis"
            assert entries(rig, ref) == {"eu": 1, "us": 0}
    assert outbox(tmp_path / "outbox.db")[order_id].attempts == ("eu", "us")


@pytest.mark.parametrize("outage", ["region", "redis"])
async def test_region_down_new_orders_flow_in_doubt_wait_then_count_once(
    rig: GeoStack, tmp_path: Path, device_id: str, outage: str
) -> None:
    """eu down (or only its Redis): new orders finish in us; orders in doubt wait at count 0."""
    eu, _us = rig.region("eu"), rig.region("us")
    window = 5  # the agents' in-flight window
    async with (
        # A receipt timeout longer than the test: the window never slides at eu.
        geo_agent(rig.agent_regions("eu"), tmp_path / "a.db", device_id=f"{device_id}-a",
                  max_inflight=window, receipt_timeout_s=60.0) as at_eu,
        geo_agent(rig.agent_regions("us"), tmp_path / "b.db", device_id=f"{device_id}-b",
                  max_inflight=window) as at_us,
    ):  # fmt: skip
        await wait_until(lambda: at_eu.connected and at_us.connected, what="agents connected")
        assert eu.bridge is not None
        assert eu.bridge.pid is not None
        if outage == "region":
            # eu's bridge stops taking orders: what at_eu publishes now is in doubt when eu dies.
            os.kill(eu.bridge.pid, signal.SIGSTOP)
        else:
            # Only Redis dies: eu's bridge holds what it gets (no PUBACK, no receipt).
            redis_pid = eu.redis.pid
            eu.redis.kill()
            assert redis_pid is not None
            assert not pid_alive(redis_pid)
        doubtful = [await at_eu.submit() for _ in range(window + 5)]
        # Sent (the window's worth), unanswered: waited for, not slept on (0.5 s was the guess).
        await wait_until(
            lambda: at_eu.device.agent.publisher.inflight == window, 30, "the window sent to eu"
        )
        if outage == "region":
            killed = eu.down()
            assert killed
            assert not any(pid_alive(pid) for pid in killed)
        # New orders from both devices are receipted in us while eu is down.
        fresh = [await at_eu.submit() for _ in range(5)] + [await at_us.submit() for _ in range(5)]
        took = await wait_until(
            lambda: all(a.settled(o) for a, o in _owners(at_eu, at_us, fresh)),
            timeout_s=30, what="new orders receipted in us while eu is down",
        )  # fmt: skip
        # Each order queued before the outage is answered in us: accepted, or pending.
        await wait_until(
            lambda: all(at_eu.results(o) for o in doubtful),
            timeout_s=20, what="an answer from us for every order queued before the outage",
        )  # fmt: skip
        in_doubt = [o for o in doubtful if not at_eu.settled(o)]
        # Exactly what was in flight at eu is in doubt; the rest of the queue moved on to us.
        sends = [(await at_eu.device.agent.get(o)) for o in doubtful]
        assert len(in_doubt) == window, [
            (at_eu.results(o), at_eu.attempts(o), r.sends if r else None)
            for o, r in zip(doubtful, sends, strict=True)
        ]
        assert all(at_eu.results(o) == ["pending"] * len(at_eu.results(o)) for o in in_doubt)
        assert all(sum(entries(rig, at_eu.ref(o)).values()) == 0 for o in in_doubt)
        eu.up()
        if outage == "region":
            assert eu.wait_ready()
        await wait_until(
            lambda: all(at_eu.settled(o) for o in doubtful),
            timeout_s=60, what="orders in doubt settled after eu returned",
        )  # fmt: skip
    accepted = [at_eu.ref(o) for o in doubtful] + [
        a.ref(o) for a, o in _owners(at_eu, at_us, fresh)
    ]
    rows = {at_eu.ref(k): v for k, v in outbox(tmp_path / "a.db").items()}
    rows |= {at_us.ref(k): v for k, v in outbox(tmp_path / "b.db").items()}
    verdict = await verify_rig(rig, accepted, rows)
    assert verdict.consistent, verdict
    assert {rows[at_eu.ref(o)].attempts[0] for o in in_doubt} == {"eu"}
    print(f"{outage} down: new orders receipted in {took:.1f} s; in doubt {len(in_doubt)} "
          f"(window {window})")  # fmt: skip


def _owners(at_eu: GeoAgent, at_us: GeoAgent, order_ids: list[str]) -> list[tuple[GeoAgent, str]]:
    """The first five of ``order_ids`` are at_eu's, the rest at_us's."""
    return [(at_eu if i < 5 else at_us, o) for i, o in enumerate(order_ids)]


async def test_broker_up_without_a_bridge_fails_over(
    rig: GeoStack, tmp_path: Path, device_id: str
) -> None:
    """eu's broker restarted without persistence while eu's bridge is dead: orders go to us."""
    eu = rig.region("eu")
    assert eu.bridge is not None
    eu.bridge.kill()
    eu.broker.kill()
    eu.broker.start()  # no persistence: the dead bridge's subscription is gone
    async with geo_agent(rig.agent_regions("eu"), tmp_path / "o.db", device_id=device_id) as agent:
        await wait_until(lambda: agent.connected and agent.region == "eu", what="agent at eu")
        order_ids = [await agent.submit() for _ in range(3)]
        # failover_after_s is 1.5 s: without receipts the agent must leave eu well within 8 s.
        await wait_until(
            lambda: all(agent.settled(o) for o in order_ids), timeout_s=8,
            what="orders settled in us while eu has no bridge",
        )  # fmt: skip


async def test_partition_between_a_device_and_its_home(
    rig: GeoStack, tmp_path: Path, device_id: str
) -> None:
    """The device loses eu (its link blackholed), eu is fine: X retried at us lands in eu, once."""
    eu, us = rig.region("eu"), rig.region("us")
    with LinkHost() as host:
        port = free_port()
        host.add("device>eu", ("127.0.0.1", eu.broker.port), port)
        regions = [("eu", f"mqtt://127.0.0.1:{port}"), ("us", us.mqtt_url)]
        async with geo_agent(regions, tmp_path / "o.db", device_id=device_id) as agent:
            await wait_until(lambda: agent.connected and agent.region == "eu", what="agent at eu")
            host.blackhole("device>eu")  # both ways; nothing is reset
            order_id = await agent.submit()
            ref = agent.ref(order_id)
            await wait_until(lambda: agent.settled(order_id), what="X settled through us")
            assert agent.region == "us"
            assert entries(rig, ref) == {"eu": 1, "us": 0}  # written across into its authority
            host.heal("device>eu")  # the held PUBLISH reaches eu's bridge late: a duplicate
            await asyncio.sleep(1.0)
            assert entries(rig, ref) == {"eu": 1, "us": 0}
            fresh = await agent.submit()
            await wait_until(lambda: agent.settled(fresh), what="a new order while away")
    rows = outbox(tmp_path / "o.db")
    assert rows[order_id].attempts == ("eu", "us")
    assert rows[fresh].attempts[0] == "us"
