"""docs/how-to/change-shards.md, run as written (4 shards to 8) while agents place orders."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import redis

from schemas.names import stream_key
from tests.helpers import wait_until

from .conftest import LOAD_DEVICES, RATE_PER_S
from .load import Load
from .rig import Rig
from .runbook import Runbook

NEW_SHARDS = 8
BEATS_S = 3 * 0.5 + 0.5  # three of the rig bridges' beats, and a margin


def _pipeline_drained(url: str, shards: int) -> bool:
    """Every shard stream's consumer groups have nothing pending and no lag."""
    with redis.Redis.from_url(url) as client:
        for shard in range(shards):
            key = stream_key(shard)
            if not client.exists(key):
                continue
            for group in client.xinfo_groups(key):
                if group["pending"] or group.get("lag"):
                    return False
    return True


async def test_change_shards_under_load(rig: Rig, tmp_path: Path) -> None:
    """Stop the bridges, drain and stop the pipeline, `layout set --shards 8`, start them
    without --shards: orders placed throughout land once and end."""
    runbook = Runbook.load("change-shards.md")
    env = rig.env()
    before = await runbook.run("layout-show", env, tmp_path)
    assert json.loads(before.stdout)["shards"] == rig.shards
    old_shards = rig.shards
    async with Load([rig.device_config(d) for d in LOAD_DEVICES], RATE_PER_S) as load:
        load.start()
        await asyncio.sleep(1.0)
        await asyncio.to_thread(rig.stop_bridges)
        await wait_until(lambda: _pipeline_drained(rig.admin_url(), old_shards), 60,
                         "the pipeline drained")  # fmt: skip
        assert rig.pipeline is not None
        await asyncio.to_thread(rig.pipeline.stop)
        await asyncio.sleep(BEATS_S)
        held = load.pending()
        await runbook.run("layout-set", env, tmp_path)
        rig.shards_flag, rig.shards = None, NEW_SHARDS
        await asyncio.to_thread(rig.start_pipeline)
        await asyncio.to_thread(rig.start_bridges)
        verdict = await load.settle(rig.admin_url(), shards=NEW_SHARDS)
    after = await runbook.run("layout-show", env, tmp_path)
    assert json.loads(after.stdout)["shards"] == NEW_SHARDS
    assert held > 0  # orders waited on the devices while ingest was stopped
    assert verdict.checked > 20
    assert (len(verdict.lost), len(verdict.duplicated), len(verdict.stuck)) == (0, 0, 0)
    assert verdict.ok, verdict
    assert runbook.unrun() == []
