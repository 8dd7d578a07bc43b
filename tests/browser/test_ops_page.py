"""The ops page in real headless chromium against a real stack.

Redis (redis/redis.conf: durable), Mosquitto, an ``order-bridge`` process and
an ``order-pipeline`` process (API + one worker) with a read and an operate
token. Orders go in through MQTT while the page watches; a dead letter is
replayed by clicking the page's button. The fleet's health keys are seeded
as the health consumer writes them (pipeline/ops.py has the layout).

``OPS_SCREENSHOT=docs/ops.png`` saves the screenshot that docs/how-to/ops-page.md shows.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from playwright.async_api import BrowserContext, Page, expect

from pipeline._lua import Scripts
from pipeline.api_tokens import digest_line, new_token
from pipeline.catalog import Catalog, CatalogItem, store_catalog
from pipeline.config import PipelineConfig
from pipeline.dlq import DeadLetter, dead_letter
from pipeline.names import (
    HEALTH_DEVICES_KEY,
    HEALTH_OLDEST_KEY,
    PIPELINE_DLQ_STREAM,
    health_device_key,
)
from pipeline.records import StreamEntry
from schemas import encode
from schemas.names import orders_topic, shard_of, stream_key
from servicekit.clock import now_ms
from servicekit.version import package_version
from testrig.servers import MosquittoProcess, RedisProcess, free_port
from tests.bridge.conftest import BridgeProcess, Publisher, bridge_factory  # noqa: F401
from tests.helpers import make_order
from tests.pipeline.processes import env_for, spawn, stop_all

SHARDS = 4  # BridgeProcess runs --shards 4
READ_TOKEN = new_token()
OPERATE_TOKEN = new_token()
TOKENS = ";".join(
    [digest_line(READ_TOKEN, "read", "viewer"), digest_line(OPERATE_TOKEN, "operate", "oncall")]
)


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A private Redis run with redis/redis.conf (AOF, appendfsync always)."""
    with RedisProcess.production(tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def pipeline_api(
    tmp_path: Path, durable_redis: RedisProcess, mosquitto: MosquittoProcess
) -> AsyncIterator[str]:
    """``order-pipeline`` (API + 1 worker) with tokens; yields the API's base URL."""
    client = aioredis.Redis.from_url(durable_redis.url)
    items = {"COLA-33": CatalogItem(price=150, stock=1_000_000)}
    await store_catalog(client, Catalog(items=items, currency="EUR"), shards=SHARDS)
    await client.aclose()
    port = free_port()
    config = PipelineConfig(
        redis_url=durable_redis.url, mqtt_url=mosquitto.url, shards=SHARDS, http_port=port,
        workers=1, block_ms=100, api_tokens=TOKENS,
    )  # fmt: skip
    process = spawn([], env_for(config, log_level="info"), tmp_path / "pipeline.log")
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as http:
            while True:
                assert process.poll() is None, (tmp_path / "pipeline.log").read_text()
                try:
                    async with http.get(f"{base}/healthz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "the orders API did not come up"
                await asyncio.sleep(0.1)
        yield base
    finally:
        stop_all([process])


async def seed_fleet(client: aioredis.Redis) -> None:
    """Three devices online, one offline (its Will came), one silent past the 900 s default;
    mid-upgrade: two on 0.2.0 (both online), three on 0.1.0 (one online)."""
    now = now_ms()
    devices = {
        "kiosk-berlin-01": ("1", 1_000, 1_200, 2, "0.2.0"),
        "kiosk-berlin-02": ("1", 2_000, 0, 0, "0.1.0"),
        "fridge-lyon-07": ("1", 3_000, 45_000, 12, "0.2.0"),
        "charger-oslo-3": ("0", 30_000, 7_200_000, 340, "0.1.0"),
        "vending-rome-9": ("1", 3_000_000, 900_000, 57, "0.1.0"),
    }
    for device_id, (online, seen_ago, oldest, depth, version) in devices.items():
        seen_at = now - seen_ago
        await client.zadd(HEALTH_DEVICES_KEY, {device_id: seen_at})
        await client.zadd(HEALTH_OLDEST_KEY, {device_id: oldest})
        await client.hset(health_device_key(device_id), mapping={
            "online": online, "at": seen_at, "seen_at": seen_at, "outbox_depth": depth,
            "outbox_bytes": depth * 180, "oldest_unreceipted_age_ms": oldest,
            "held": 1 if device_id == "charger-oslo-3" else 0,
            "last_broker_error": "keepalive timeout" if online == "0" else "",
            "agent_version": version,
        })  # fmt: skip


async def dead_lettered_order(client: aioredis.Redis, device_id: str) -> tuple[str, str]:
    """An accepted order the pipeline gave up on, as the worker writes it; (dlq id, order id)."""
    order = make_order(device_id, 1)
    fields = {
        "order_id": order.order_id.encode(),
        "device_id": device_id.encode(),
        "seq": b"1",
        "received_at": str(now_ms()).encode(),
        "payload": encode(order),
    }
    stream = stream_key(shard_of(device_id, SHARDS))
    # Dead-lettering is once per source entry, so each call needs its own entry id.
    entry = StreamEntry(stream=stream, entry_id=f"{now_ms()}-1", fields=fields, deliveries=5)
    await dead_letter(
        client, Scripts(), [DeadLetter(entry, "max_deliveries", "PaymentGatewayDown: 503")]
    )
    rows: Any = await client.xrange(PIPELINE_DLQ_STREAM, count=100)
    entry_id = next(i for i, f in rows if f[b"order_id"] == order.order_id.encode())
    return entry_id.decode(), order.order_id


class Load(threading.Thread):
    """Publishes valid orders at QoS 1 from 20 devices until stopped."""

    def __init__(self, mqtt_url: str) -> None:
        super().__init__(name="order-load", daemon=True)
        self.publisher = Publisher(mqtt_url)
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        """Send about 200 orders/s."""
        seq = 0
        while not self.stop.is_set():
            seq += 1
            for device in range(20):
                order = make_order(f"load-{device:02d}", seq)
                self.publisher.publish(orders_topic(order.device_id), encode(order))
                self.sent += 1
            time.sleep(0.1)

    def finish(self) -> None:
        """Stop, wait for the broker's acks, disconnect."""
        self.stop.set()
        self.join(10)
        self.publisher.wait_all()
        self.publisher.close()


async def number(page: Page, selector: str) -> float:
    """A number the page shows (thousands separators and '–' handled)."""
    raw = (await page.text_content(selector) or "").replace(",", "").strip()
    return float(raw) if re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", raw) else -1.0


async def wait_number(
    page: Page, selector: str, holds: Callable[[float], bool], what: str, timeout_s: float = 20
) -> float:
    """Poll the page until the number at ``selector`` satisfies ``holds``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await number(page, selector)
        if holds(value):
            return value
        assert time.monotonic() < deadline, f"{what}: {selector} shows {value}"
        await asyncio.sleep(0.1)


async def use_token(page: Page, token: str, role: str) -> None:
    """Type a token into the page and wait until the API answered with its role."""
    await page.fill("#token", token)
    await page.click("#token-save")
    await expect(page.locator("#status")).to_contain_text(f"role {role}", timeout=10_000)


async def test_ops_page_live_numbers_and_replay(  # noqa: PLR0917 - fixtures
    browser: BrowserContext,
    pipeline_api: str,
    durable_redis: RedisProcess,
    mosquitto: MosquittoProcess,
    bridge_factory: Callable[..., BridgeProcess],  # noqa: F811
    tmp_path: Path,
) -> None:
    """Live numbers rise under load; operate replays through the page, read gets 403 shown."""
    client = aioredis.Redis.from_url(durable_redis.url)
    bridge = bridge_factory(
        mosquitto.url, durable_redis.url, "--heartbeat-interval-s", "0.5",
        "--redis-require-durable",
    )  # fmt: skip
    bridge.start()
    await seed_fleet(client)
    page = await browser.new_page()
    page.set_default_timeout(20_000)
    expect.set_options(timeout=20_000)  # a loaded CI machine: generous, never a fixed sleep

    # Without a token the page loads (no data in it) and asks for one.
    await page.goto(f"{pipeline_api}/ops?interval_ms=500")
    await expect(page.locator("#message")).to_contain_text("401")
    await use_token(page, OPERATE_TOKEN, "operate")

    # Fleet, bridges and durability as seeded / as the live bridge beats.
    await expect(page.locator("#fleet-online")).to_have_text("3")
    await expect(page.locator("#fleet-offline")).to_have_text("1")
    await expect(page.locator("#fleet-stale")).to_have_text("1")
    worst = page.locator("#worst tbody tr")
    await expect(worst.first).to_contain_text("charger-oslo-3")
    await expect(worst.first).to_contain_text("2.0 h")
    versions = page.locator("#versions tbody tr")
    await expect(versions.nth(0).locator("td")).to_have_text(["0.1.0", "3", "1"])
    await expect(versions.nth(1).locator("td")).to_have_text(["0.2.0", "2", "2"])
    bridge_row = page.locator("#bridges tbody tr", has_text=bridge.client_id)
    await expect(bridge_row).to_contain_text("ready")
    await expect(bridge_row.locator("td").nth(2)).to_have_text(package_version())
    await expect(page.locator("#redis-durable")).to_have_text("yes")

    # Under load: entries added and throughput go up, and the pipeline reads them.
    before = await wait_number(page, "#total-added", lambda v: v >= 0, "a first sample")
    load = Load(mosquitto.url)
    load.start()
    try:
        during = await wait_number(page, "#total-added", lambda v: v >= before + 50, "orders in")
        await wait_number(page, "#rate-in", lambda v: v > 10, "throughput in")
        await wait_number(page, "#rate-read", lambda v: v > 10, "throughput read")
        later = await wait_number(page, "#total-added", lambda v: v > during + 50, "still rising")
    finally:
        load.finish()
    assert later > during > before
    shard_lengths = page.locator("#shards tbody tr")
    await expect(shard_lengths).to_have_count(SHARDS)
    await wait_number(page, "#total-added", lambda v: v >= load.sent, "every order counted")

    # A dead letter: the page lists it; operate replays it by clicking.
    entry_id, order_id = await dead_lettered_order(client, "kiosk-berlin-02")
    row = page.locator("#dlq tbody tr", has_text=order_id)
    await expect(row).to_contain_text("max_deliveries")
    await expect(page.locator("#dlq-pipeline")).to_have_text("1")
    if os.environ.get("OPS_SCREENSHOT"):
        await page.wait_for_timeout(1500)  # a few samples after the load, for the picture
    shot = tmp_path / "ops.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if target := os.environ.get("OPS_SCREENSHOT"):
        shutil.copyfile(shot, target)

    await row.locator("button.replay").click()
    await expect(page.locator("#message")).to_contain_text(f"Replayed {entry_id}")
    await expect(page.locator("#dlq-pipeline")).to_have_text("0")
    assert await client.xlen(PIPELINE_DLQ_STREAM) == 0
    headers = {"Authorization": f"Bearer {READ_TOKEN}"}
    url = f"{pipeline_api}/v1/devices/kiosk-berlin-02/orders/{order_id}"
    async with aiohttp.ClientSession(headers=headers) as http:
        deadline = time.monotonic() + 20
        while True:
            async with http.get(url) as response:
                status = (await response.json()).get("status") if response.status == 200 else None
            if status == "fulfilled":
                break
            assert time.monotonic() < deadline, f"replayed order not processed: {status}"
            await asyncio.sleep(0.1)

    # A read token: replay is disabled, and forcing the click gets the API's 403 shown.
    entry_id, order_id = await dead_lettered_order(client, "fridge-lyon-07")
    await use_token(page, READ_TOKEN, "read")
    button = page.locator("#dlq tbody tr", has_text=order_id).locator("button.replay")
    await expect(button).to_be_disabled()
    await button.evaluate("b => { b.disabled = false; }")
    await button.click()
    await expect(page.locator("#message")).to_contain_text("403 forbidden")
    await expect(page.locator("#message")).to_contain_text("needs role operate")
    assert await client.xlen(PIPELINE_DLQ_STREAM) == 1  # still there

    # A bridge killed: its heartbeat stops and the page flags it stale.
    bridge.kill()
    await expect(bridge_row).to_contain_text("stale", timeout=15_000)
    await client.aclose()
