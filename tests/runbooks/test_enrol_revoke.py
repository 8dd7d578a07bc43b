"""docs/how-to/enrol-devices.md: enrol and revoke live, run as written while agents place orders."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.helpers import wait_until

from .conftest import LOAD_DEVICES, RATE_PER_S
from .load import Load
from .rig import Rig
from .runbook import Runbook

NEW = ("kiosk-0501", "kiosk-0502")
REVOKED = "kiosk-0502"
LIVE_S = 1.0  # the bound: a revoked session ends within a second


async def test_enrol_and_revoke_live_under_load(rig: Rig, tmp_path: Path) -> None:
    """Two devices enrolled live connect and place orders; one is drained and revoked:
    its session is gone when the command returns, it is refused after, nobody else is
    disturbed, and every order (the revoked device's too) lands once."""
    runbook = Runbook.load("enrol-devices.md")
    env = rig.env()
    pid = rig.broker.pid
    async with Load([rig.device_config(d) for d in LOAD_DEVICES], RATE_PER_S) as load:
        load.start()
        await wait_until(lambda: load.connected() == len(LOAD_DEVICES), 60, "the load connected")
        connects = {d: load.connects(d) for d in LOAD_DEVICES}
        await runbook.run("enrol", env, tmp_path)
        # The device's folder arrives on the device and its agent starts.
        for device_id in NEW:
            await load.add(rig.device_config(device_id))
        await wait_until(lambda: load.connected() == len(LOAD_DEVICES) + len(NEW), 30,
                         "the enrolled devices connected")  # fmt: skip
        await wait_until(
            lambda: all(sum(1 for d, _ in load.orders if d == n) >= 3 for n in NEW), 30,
            "orders on the enrolled devices",
        )  # fmt: skip
        load.retire(REVOKED)
        assert await load.drained({REVOKED}, 30)
        revoked_orders = [ref for ref in load.orders if ref[0] == REVOKED]
        agent = load.agents[REVOKED]
        await runbook.run("revoke", env, tmp_path)
        returned = time.monotonic()
        await wait_until(lambda: not agent.publisher.connected, LIVE_S, "the session ended")
        ended_after_s = time.monotonic() - returned
        failures = load.connects(REVOKED, "edge_mqtt_connect_failures_total")
        await wait_until(
            lambda: load.connects(REVOKED, "edge_mqtt_connect_failures_total") > failures,
            10, "a refused reconnect",
        )  # fmt: skip
        assert not agent.publisher.connected
        await load.remove(REVOKED)
        await asyncio.sleep(1.0)
        verdict = await load.settle(rig.admin_url(), shards=rig.shards)
        assert {d: load.connects(d) for d in LOAD_DEVICES} == connects
    await runbook.run("check", env, tmp_path)
    assert ended_after_s < LIVE_S
    assert rig.broker.pid == pid
    assert len(revoked_orders) >= 3
    assert not (rig.secure.registry.devices_dir / REVOKED).exists()
    assert (rig.secure.registry.devices_dir / NEW[0] / "agent.toml").exists()
    assert set(revoked_orders) <= set(load.orders)
    assert {d for d, _ in load.orders} >= set(NEW)
    assert (len(verdict.lost), len(verdict.duplicated), len(verdict.stuck)) == (0, 0, 0)
    assert verdict.ok, verdict
    assert runbook.unrun() == []
