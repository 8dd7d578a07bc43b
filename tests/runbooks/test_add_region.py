"""docs/how-to/add-region.md: a second region added beside the rig's, run as written under load.

The page's blocks start the new region's Redis, broker, bridge and pipeline
as background processes (pid files in ``NEW_REGION_DIR``); the test does what
the page's prose says between blocks (restart the running region's bridges
with the region flags, restart the agents on their edited ``agent.toml``),
then checks each region's orders against that region's Redis: 0 lost,
0 duplicated, 0 stuck, and none of them in the other region.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import redis.asyncio as aioredis

from edge_agent import AgentConfig
from fleet.verify import OrderRef, Verdict, verify
from testrig.servers import free_port
from testrig.services import pid_alive
from tests.enrolment.conftest import dynsec_plugin
from tests.helpers import wait_until
from tests.tools import require_tool

from .conftest import LOAD_DEVICES, RATE_PER_S
from .load import Load
from .rig import FAST_RECONNECT, REPO, Rig
from .runbook import VARIABLES, Runbook

REGION, NEW_REGION = "eu", "us"
# The second half of the load's devices move home to the new region.
NEW_HOME = LOAD_DEVICES[len(LOAD_DEVICES) // 2 :]
PHASE_S = 3.0  # load on each configuration before the next move
SERVERS = ("pipeline", "bridge", "broker", "redis")


def _env(rig: Rig, new_dir: Path) -> dict[str, str]:
    bridges = " ".join(f"http://127.0.0.1:{b.http_port}" for b in rig.bridges)
    assert rig.pipeline is not None
    api = rig.pipeline.url
    return {
        **rig.env(),
        "REGION": REGION, "NEW_REGION": NEW_REGION, "NEW_REGION_DIR": str(new_dir),
        "NEW_REDIS_HOST": "127.0.0.1", "NEW_REDIS_PORT": str(free_port()),
        "NEW_BROKER_HOST": "localhost", "NEW_BROKER_PORT": str(free_port()),
        "NEW_BRIDGE_HOST": "127.0.0.1", "NEW_BRIDGE_PORT": str(free_port()),
        "NEW_API_HOST": "127.0.0.1", "NEW_API_PORT": str(free_port()), "API_URL": api,
        "SHARDS": str(rig.shards), "DYNSEC_PLUGIN": dynsec_plugin(),
        "BRIDGE_URLS": bridges, "DEVICES_DIR": str(rig.workdir / "installed"),
        "NEW_HOME_DEVICES": " ".join(NEW_HOME),
    }  # fmt: skip


@contextlib.contextmanager
def _new_region_stopped(new_dir: Path) -> Iterator[None]:
    """At the end, SIGTERM what the page started (by its pid files), services first."""
    try:
        yield
    finally:
        for name in SERVERS:
            pid_file = new_dir / f"{name}.pid"
            with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGTERM)


def _installed_config(rig: Rig, device_id: str) -> AgentConfig:
    """The agent as the device runs it after the page edited its agent.toml."""
    installed = rig.workdir / "installed" / device_id
    settings = tomllib.loads((installed / "agent.toml").read_text())
    local = {"ca_file": str(installed / "ca.crt"), "db": ":memory:", "http_enabled": False}
    return AgentConfig(**{**settings, **local, **FAST_RECONNECT})


def _admin_url(rig: Rig, port: str) -> str:
    password = (rig.secrets_dir / "admin-redis").read_text().strip()
    return f"redis://admin:{password}@127.0.0.1:{port}/0"


async def _absent(redis_url: str, orders: list[OrderRef], shards: int) -> bool:
    """None of ``orders`` is in this Redis's streams (each is 'lost' there)."""
    client = aioredis.from_url(redis_url)
    try:
        verdict = await verify(client, orders, shards=shards)
    finally:
        await client.aclose()
    return len(verdict.lost) == len(orders)


def _lookup(api: str, order_id: str) -> tuple[int, str | None]:
    """``GET /v1/orders/{order_id}`` on ``api``: status and ``Orders-Region``."""
    with urllib.request.urlopen(f"{api}/v1/orders/{order_id}", timeout=10) as answer:
        return answer.status, answer.headers.get("Orders-Region")


def _clean(verdict: Verdict) -> tuple[int, int, int]:
    return len(verdict.lost), len(verdict.duplicated), len(verdict.stuck)


async def test_add_region_under_load(rig: Rig, tmp_path: Path) -> None:
    """New region up, running bridges taught it, agents given both regions: every order
    lands once in its home region's Redis and ends, and nothing in the other."""
    for tool in ("redis-server", "redis-cli", "mosquitto", "openssl", "curl", "jq"):
        require_tool(tool)
    runbook = Runbook.load("add-region.md")
    new_dir = tmp_path / "new-region"
    env = _env(rig, new_dir)
    home = _admin_url(rig, str(rig.redis.port))
    new = _admin_url(rig, env["NEW_REDIS_PORT"])
    argv = {id(b): list(b.argv) for b in rig.bridges}
    pipeline = rig.pipeline
    assert pipeline is not None
    pipeline_argv = list(pipeline.argv)
    pipeline_pid = pipeline.pid
    try:
        with _new_region_stopped(new_dir):
            # Phase 1: single-region agents place orders while the region is added.
            async with Load([rig.device_config(d) for d in LOAD_DEVICES], RATE_PER_S) as before:
                before.start()
                for block in ("new-redis", "new-broker", "new-services"):
                    await runbook.run(block, env, REPO)
                pids = [b.process.pid for b in rig.bridges if b.process is not None]
                for bridge in rig.bridges:
                    bridge.argv += [
                        "--region", REGION,
                        "--region-redis", f"{REGION}=redis://bridge@127.0.0.1:{rig.redis.port}/0",
                        "--region-redis",
                        f"{NEW_REGION}=redis://bridge@127.0.0.1:{env['NEW_REDIS_PORT']}/0",
                    ]  # fmt: skip
                await asyncio.to_thread(rig.restart_bridges)
                await runbook.run("check-bridges", env, REPO)
                pipeline.argv += [
                    "--region", REGION, "--region-api-allow-http",
                    "--region-api", f"{NEW_REGION}=http://127.0.0.1:{env['NEW_API_PORT']}",
                ]  # fmt: skip
                await asyncio.to_thread(pipeline.restart)
                await runbook.run("check-lookup", env, REPO)
                await asyncio.sleep(PHASE_S)
                first = await before.settle(home, shards=rig.shards)
            # Phase 2: the agents restart on their edited agent.toml, both regions listed.
            await runbook.run("agent-regions", env, REPO)
            configs = [_installed_config(rig, d) for d in LOAD_DEVICES]
            stay = [c for c in configs if c.device_id not in NEW_HOME]
            moved = [c for c in configs if c.device_id in NEW_HOME]
            async with (
                Load(stay, RATE_PER_S / 2) as at_home,
                Load(moved, RATE_PER_S / 2) as at_new,
            ):
                at_home.start()
                at_new.start()
                await asyncio.sleep(PHASE_S)
                await wait_until(lambda: len(at_new.orders) > 10, 30, "orders in the new region")
                kept, landed = await asyncio.gather(
                    at_home.settle(home, shards=rig.shards),
                    at_new.settle(new, shards=rig.shards),
                )
            regions = {c.device_id: [r.name for r in c.regions] for c in configs}
            not_in_new = await _absent(new, before.orders + at_home.orders, rig.shards)
            not_at_home = await _absent(home, at_new.orders, rig.shards)
            found = await asyncio.to_thread(_lookup, pipeline.url, at_new.orders[0][1])
            alive = {n: pid_alive(int((new_dir / f"{n}.pid").read_text())) for n in SERVERS}
    finally:
        # Later tests restart these replicas: single-region again (the new region is gone).
        for bridge in rig.bridges:
            bridge.argv = argv[id(bridge)]
        pipeline.argv = pipeline_argv
    assert [b.process.pid for b in rig.bridges if b.process is not None] != pids
    assert all(alive.values()), alive
    assert found == (200, NEW_REGION)
    assert pipeline.pid != pipeline_pid
    assert {d: r for d, r in regions.items() if d in NEW_HOME} == {
        d: [NEW_REGION, REGION] for d in NEW_HOME
    }
    assert {d: r for d, r in regions.items() if d not in NEW_HOME} == {
        d: [REGION, NEW_REGION] for d in LOAD_DEVICES if d not in NEW_HOME
    }
    for verdict in (first, kept, landed):
        assert verdict.checked > 10
        assert _clean(verdict) == (0, 0, 0), verdict
        assert verdict.ok, verdict
    assert not_in_new
    assert not_at_home
    assert before.refused == at_home.refused == at_new.refused == 0
    assert set(env) <= set(VARIABLES)
    assert runbook.unrun() == []
