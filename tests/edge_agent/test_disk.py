"""Disk faults on a real, small tmpfs: a full disk is an error the operator sees, never a crash."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from edge_agent import AgentConfig, EdgeAgent
from tests.tools import unavailable

from .agent_process import AgentProcess
from .conftest import order_body


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted for this test and unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        unavailable(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Fill the file system completely with a ballast file; prove it is full."""
    ballast = disk / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * chunk)
    finally:
        os.close(fd)
    fd = os.open(disk / "probe", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError, match="No space left") as info:
            os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    assert info.value.errno == errno.ENOSPC
    (disk / "probe").unlink(missing_ok=True)
    return ballast


def big_order(order_id: str) -> dict[str, object]:
    body = order_body(order_id)
    body["attrs"] = {"note": "x" * 8000}
    return body


async def _post_until_refused(session: aiohttp.ClientSession, prefix: str) -> dict[str, object]:
    """Post big orders until one is refused; return its problem body."""
    for i in range(300):
        async with session.post("/v1/orders", json=big_order(f"{prefix}-{i:04d}")) as resp:
            if resp.status != 202:
                assert resp.status == 507, await resp.text()
                body: dict[str, object] = await resp.json()
                return body
    raise AssertionError("a full disk never refused an order")


async def test_disk_full_is_507_and_health_shows_it(
    small_disk: Path, make_config: Callable[..., AgentConfig]
) -> None:
    """On a full disk new orders get 507 disk_full and health says so; stored ones stay readable."""
    config = make_config(db=str(small_disk / "outbox.db"), mqtt_url="mqtt://127.0.0.1:9")
    async with (
        EdgeAgent(config) as agent,
        aiohttp.ClientSession(f"http://127.0.0.1:{agent.http_port}") as http,
    ):
        for i in range(5):
            async with http.post("/v1/orders", json=order_body(f"keep-{i:04d}")) as resp:
                assert resp.status == 202
        ballast = fill(small_disk)
        problem = await _post_until_refused(http, "fill")
        assert problem["reason"] == "disk_full"
        async with http.get("/healthz") as resp:
            assert resp.status == 503
            health = await resp.json()
        assert str(health["storage_error"]).startswith("disk_full")
        for i in range(5):
            async with http.get(f"/v1/orders/keep-{i:04d}") as resp:
                assert resp.status == 200
        ballast.unlink()  # the operator frees space: the agent recovers by itself
        async with http.post("/v1/orders", json=order_body("after-0001")) as resp:
            assert resp.status == 202
        async with http.get("/healthz") as resp:
            assert resp.status == 200


async def test_restart_on_full_disk_starts_and_reports(
    small_disk: Path, tmp_path: Path, device_id: str, make_config: Callable[..., AgentConfig]
) -> None:
    """An agent restarted on a full disk (WAL database) comes up, reports the problem, exits 0."""
    db = small_disk / "outbox.db"
    async with EdgeAgent(make_config(db=str(db), http_enabled=False)) as agent:
        for i in range(20):
            await agent.submit(order_body(f"old-{i:04d}"))
    fill(small_disk)
    process = AgentProcess(tmp_path, device_id=device_id, mqtt_url="mqtt://127.0.0.1:9", db=db)
    process.start()
    try:
        async with aiohttp.ClientSession(process.url) as http:
            problem = await _post_until_refused(http, "new")
            assert problem["reason"] == "disk_full"
            async with http.get("/healthz") as resp:
                assert resp.status == 503
                health = await resp.json()
            assert health["outbox_depth"] == 20
            assert str(health["storage_error"]).startswith("disk_full")
            async with http.get("/v1/orders/old-0000") as resp:
                assert resp.status == 200
        assert process.process is not None
        assert process.process.poll() is None
        assert await asyncio.to_thread(process.sigterm) == 0
        assert "outbox_storage_error" in process.log_tail(200)
    finally:
        process.stop()


async def test_new_database_on_full_disk_waits_for_space(
    small_disk: Path, make_config: Callable[..., AgentConfig]
) -> None:
    """With no room for its database the agent runs, says so, and opens it once space is back."""
    ballast = fill(small_disk)
    config = make_config(db=str(small_disk / "outbox.db"), mqtt_url="mqtt://127.0.0.1:9")
    async with (
        EdgeAgent(config) as agent,
        aiohttp.ClientSession(f"http://127.0.0.1:{agent.http_port}") as http,
    ):
        async with http.post("/v1/orders", json=order_body("early-0001")) as resp:
            assert resp.status in (503, 507)
            assert (await resp.json())["reason"] in ("disk_full", "io_error", "unavailable")
        async with http.get("/healthz") as resp:
            assert resp.status == 503
            assert (await resp.json())["storage_error"] is not None
        ballast.unlink()
        for _ in range(100):
            async with http.post("/v1/orders", json=order_body("later-0001")) as resp:
                if resp.status == 202:
                    break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the agent never opened its database after space came back")


async def test_read_only_file_system_is_reported(
    small_disk: Path, make_config: Callable[..., AgentConfig]
) -> None:
    """An agent started on a read-only file system runs, reports it, and recovers once writable."""
    config = make_config(db=str(small_disk / "outbox.db"), mqtt_url="mqtt://127.0.0.1:9")
    async with EdgeAgent(config) as agent:
        await agent.submit(order_body("rw-000001"))
    await asyncio.to_thread(_remount, small_disk, "ro")
    try:
        async with (
            EdgeAgent(config) as agent,
            aiohttp.ClientSession(f"http://127.0.0.1:{agent.http_port}") as http,
        ):
            async with http.post("/v1/orders", json=order_body("ro-000001")) as resp:
                assert resp.status == 503
                assert (await resp.json())["reason"] in ("read_only", "io_error", "unavailable")
            async with http.get("/healthz") as resp:
                assert resp.status == 503
                assert (await resp.json())["storage_error"] is not None
            await asyncio.to_thread(_remount, small_disk, "rw")
            for _ in range(100):
                async with http.post("/v1/orders", json=order_body("rw-000002")) as resp:
                    if resp.status == 202:
                        break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the agent did not recover after the remount")
            async with http.get("/v1/orders/rw-000001") as resp:
                assert resp.status == 200
    finally:
        await asyncio.to_thread(_remount, small_disk, "rw")


def _remount(mount: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mount)], check=True)
