"""GEO.md scenario 7: failback reprocesses nothing; a marker TTL below the retry horizon
is refused at start."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bridge.cli import main as bridge_main
from bridge.config import BridgeConfig
from edge_agent import AgentConfig
from edge_agent.cli import main as agent_main
from fleet.geo.stack import GeoStack
from schemas.names import DEDUP_TTL_S
from testrig.services import pid_alive
from tests.helpers import wait_until

from .conftest import geo_agent, outbox, verify_rig


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
        assert pid is not None
        assert not pid_alive(pid)
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


def test_marker_ttl_shorter_than_the_retry_horizon_is_refused_at_start(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """order-bridge and edge-agent each refuse, at start, a dedup TTL resends could outlive."""
    bridge_exit = bridge_main(
        ["--dedup-ttl-s", "3600", "--agent-retry-horizon-s", "7200",
         "--region", "eu", "--region-redis", "eu=redis://127.0.0.1:1/0"]
    )  # fmt: skip
    bridge_err = capsys.readouterr().err
    assert bridge_exit == 2, bridge_err
    assert "dedup_ttl_s" in bridge_err
    agent_exit = agent_main(
        ["--device-id", "ttl-check", "--db", ":memory:", "--resend-max-age-s", str(DEDUP_TTL_S),
         "--region", "eu=mqtt://127.0.0.1:1"]
    )  # fmt: skip
    agent_err = capsys.readouterr().err
    assert agent_exit == 2, agent_err
    assert "resend_max_age_s" in agent_err
    # The shipped defaults pass the same checks.
    assert BridgeConfig(region="eu").dedup_ttl_s > BridgeConfig().agent_retry_horizon_s
    AgentConfig(device_id="ttl-check", region=("eu=mqtt://127.0.0.1:1",)).validate()
