"""docs/how-to/rotate-redis-password.md, run as written while agents place orders."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import redis
from redis.exceptions import AuthenticationError

from tests.tools import require_tool

from .conftest import LOAD_DEVICES, RATE_PER_S
from .load import Load
from .rig import Rig
from .runbook import Runbook

USERS = ("bridge", "pipeline")


def _password(rig_secrets: Path, user: str) -> str:
    return (rig_secrets / f"{user}-redis").read_text().strip()


def _logs_in(port: int, user: str, password: str) -> bool:
    try:
        with redis.Redis(port=port, username=user, password=password) as client:
            return bool(client.ping())
    except AuthenticationError:
        return False


async def test_rotate_redis_passwords_under_load(rig: Rig, tmp_path: Path) -> None:
    """Add, roll, remove: the services move to new passwords with orders flowing, and
    every order lands exactly once; the old passwords are refused afterwards."""
    require_tool("redis-cli")
    runbook = Runbook.load("rotate-redis-password.md")
    env = rig.env()
    old = {user: _password(rig.secrets_dir, user) for user in USERS}
    async with Load([rig.device_config(d) for d in LOAD_DEVICES], RATE_PER_S) as load:
        load.start()
        await asyncio.sleep(1.0)
        await runbook.run("add-password", env, tmp_path)
        new = {u: (rig.secrets_dir / f"{u}-redis.new").read_text().strip() for u in USERS}
        # Both passwords work between the blocks.
        for user in USERS:
            assert _logs_in(rig.redis.port, user, old[user])
            assert _logs_in(rig.redis.port, user, new[user])
        await runbook.run("swap-files", env, tmp_path)
        pids = [b.process.pid for b in rig.bridges if b.process is not None]
        await asyncio.to_thread(rig.restart_bridges)
        assert rig.pipeline is not None
        await asyncio.to_thread(rig.pipeline.restart)
        await runbook.run("remove-old", env, tmp_path)
        await asyncio.sleep(1.0)
        verdict = await load.settle(rig.admin_url(), shards=rig.shards)
    assert [b.process.pid for b in rig.bridges if b.process is not None] != pids
    assert len(pids) == len(rig.bridges)
    for user in USERS:
        assert not _logs_in(rig.redis.port, user, old[user])
        assert _logs_in(rig.redis.port, user, new[user])
        assert _password(rig.secrets_dir, user) == new[user]
    acl_file = (rig.workdir / "users.acl").read_text()
    for user in USERS:
        assert hashlib.sha256(new[user].encode()).hexdigest() in acl_file
        assert hashlib.sha256(old[user].encode()).hexdigest() not in acl_file
        assert old[user] not in acl_file
    assert verdict.checked > 20
    assert (len(verdict.lost), len(verdict.duplicated), len(verdict.stuck)) == (0, 0, 0)
    assert verdict.ok, verdict
    assert load.refused == 0
    assert runbook.unrun() == []
