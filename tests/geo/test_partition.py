"""GEO.md scenario 4: a partition between regions only (bridge → remote Redis blackholed)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from fleet.geo.stack import GeoStack
from tests.helpers import wait_until

from .conftest import all_counts, entries, geo_agent, outbox, verify_rig


async def test_partition_local_orders_flow_cross_region_pending_then_once(
    rig: GeoStack, tmp_path: Path, device_id: str
) -> None:
    """eu|us partitioned: home orders are receipted; X (owned by eu, retried at us) is pending."""
    eu = rig.region("eu")
    assert eu.bridge is not None
    assert eu.bridge.pid is not None
    async with (
        geo_agent(rig.agent_regions("eu"), tmp_path / "a.db", device_id=f"{device_id}-a") as a,
        geo_agent(rig.agent_regions("us"), tmp_path / "b.db", device_id=f"{device_id}-b") as b,
        geo_agent(rig.agent_regions("eu"), tmp_path / "c.db", device_id=f"{device_id}-c") as c,
    ):
        await wait_until(lambda: a.connected and b.connected and c.connected, what="connected")
        # X: published to eu while eu's bridge is stopped, so it is owned by eu, unanswered.
        os.kill(eu.bridge.pid, signal.SIGSTOP)
        x = await c.submit()
        await asyncio.sleep(0.3)
        rig.partition("eu", "us")
        assert sorted(rig.partitioned()) == ["eu>us", "us>eu"]
        # c fails over to us (no receipts from eu); us cannot reach eu's Redis: pending.
        await wait_until(lambda: "pending" in c.results(x), what="a pending receipt for X")
        assert c.region == "us"
        os.kill(eu.bridge.pid, signal.SIGCONT)  # eu is whole again; only the link is cut
        # Local orders on both sides, and c's new orders (owned by us), flow meanwhile.
        local = [(a, await a.submit()) for _ in range(5)] + [
            (b, await b.submit()) for _ in range(5)
        ]
        fresh = [(c, await c.submit()) for _ in range(3)]
        await wait_until(
            lambda: all(d.settled(o) for d, o in local + fresh), timeout_s=20,
            what="local orders receipted during the partition",
        )  # fmt: skip
        assert not c.settled(x), "X settled although its authority was unreachable"
        assert sum(entries(rig, c.ref(x)).values()) <= 1
        await asyncio.sleep(1.0)  # more retries of X, each pending
        assert not c.settled(x)
        assert set(c.results(x)) == {"pending"}
        rig.heal("eu", "us")  # held bytes flow on: stale writes land late, as in real networks
        await wait_until(lambda: c.settled(x), timeout_s=30, what="X settled after healing")
    rows = {a.ref(k): v for k, v in outbox(tmp_path / "a.db").items()}
    rows |= {b.ref(k): v for k, v in outbox(tmp_path / "b.db").items()}
    rows |= {c.ref(k): v for k, v in outbox(tmp_path / "c.db").items()}
    accepted = [d.ref(o) for d, o in [*local, *fresh, (c, x)]]
    verdict = await verify_rig(rig, accepted, rows)
    assert verdict.consistent, verdict
    assert rows[c.ref(x)].attempts == ("eu", "us")
    assert all_counts(rig)["eu"][c.ref(x)] == 1
