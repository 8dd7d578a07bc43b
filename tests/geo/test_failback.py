"""GEO.md scenario 7: failback reprocesses nothing; a marker TTL below the retry horizon is refused."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from fleet.geo_stack import GeoStack
from fleet.services import console_script, pid_alive
from schemas.names import DEDUP_TTL_S

from .conftest import geo_agent, outbox, verify_rig, wait_until


async def test_failback_home_reprocesses_nothing(
    rig: GeoStack, tmp_path: Path, device_id: str
) -> None:
    """Away at us while eu's broker is down, then home again: each order processed once."""
    eu = rig.region("eu")
    async with geo_agent(
        rig.agent_regions("eu"), tmp_path / "o.db", device_id=device_id, failback_probe_s=0.5
    ) as agent:
        await wait_until(lambda: agent.connected and agent.region == "eu", what="agent at eu")
        before = [await agent.submit() for _ in range(3)]
        await wait_until(lambda: all(agent.settled(o) for o in before), what="home orders")
        pid = eu.broker.pid
        eu.broker.kill()
        assert pid is not None and not pid_alive(pid)
        away = [await agent.submit() for _ in range(3)]
        await wait_until(lambda: all(agent.settled(o) for o in away), what="orders settled at us")
        assert agent.region == "us"
        eu.broker.start()
        await wait_until(lambda: agent.region == "eu" and agent.connected, what="failback")
        after = [await agent.submit() for _ in range(3)]
        await wait_until(lambda: all(agent.settled(o) for o in after), what="orders back home")
        order_ids = before + away + after
        refs = [agent.ref(o) for o in order_ids]
    rows = {agent.ref(k): v for k, v in outbox(tmp_path / "o.db").items()}
    assert [rows[r].attempts for r in refs] == [("eu",)] * 3 + [("us",)] * 3 + [("eu",)] * 3
    # Every order ends in the pipeline of its authority, once (histories and events).
    for _ in range(100):
        verdict = await verify_rig(rig, refs, rows, statuses=True)
        if not verdict.stuck:
            break
        await asyncio.sleep(0.2)
    assert verdict.ok, verdict
    assert verdict.per_region == {"eu": 6, "us": 3}


def test_marker_ttl_shorter_than_the_retry_horizon_is_refused_at_start() -> None:
    """order-bridge and edge-agent each refuse a dedup TTL the agents' resends could outlive."""
    bridge = subprocess.run(
        [console_script("order-bridge"), "--dedup-ttl-s", "3600", "--agent-retry-horizon-s",
         "7200", "--region", "eu", "--region-redis", "eu=redis://127.0.0.1:1/0"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bridge.returncode == 2, bridge.stderr
    assert "dedup_ttl_s" in bridge.stderr
    agent = subprocess.run(
        [console_script("edge-agent"), "--device-id", "ttl-check", "--db", ":memory:",
         "--resend-max-age-s", str(DEDUP_TTL_S), "--region", "eu=mqtt://127.0.0.1:1"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert agent.returncode == 2, agent.stderr
    assert "retry_horizon_too_long" in agent.stderr or "resend_max_age_s" in agent.stderr
