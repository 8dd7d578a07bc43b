"""``order-pipeline layout set --shards N`` end to end: real Redis, Mosquitto, bridge, pipeline.

4 shards → 8: orders before the change, resent after it (their dedup markers
moved, so they stay duplicates), and new orders after it: every order lands
once, in its shard, is processed, its record is found under the new layout,
and no unit of stock is lost or made up.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from pipeline.names import order_key
from schemas import encode
from schemas.names import MANIFEST_KEY, orders_topic, shard_of, stream_key
from servicekit.layout import Manifest
from testrig.servers import MosquittoProcess
from tests.bridge.conftest import BridgeProcess, Publisher
from tests.helpers import make_order, wait_until_blocking

BridgeFactory = Callable[..., BridgeProcess]
ROOT = Path(__file__).resolve().parents[2]
CATALOG = ROOT / "pipeline" / "demo_catalog.toml"
TERMINAL = {b"fulfilled", b"rejected", b"failed"}
Ref = tuple[str, int]


def pipeline(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


class Worker:
    """``order-pipeline worker`` without --shards (it adopts the manifest's)."""

    def __init__(self, log: Path, mqtt_url: str, redis_url: str) -> None:
        self.log = log
        self._out = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "worker", "--mqtt-url", mqtt_url,
             "--redis-url", redis_url, "--block-ms", "100", "--log-level", "info"],
            cwd=ROOT, stdout=self._out, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def stop(self) -> int:
        self.process.terminate()
        code = self.process.wait(30)
        self._out.close()
        return code

    def tail(self) -> str:
        return self.log.read_text()[-3000:]


def processed(client: redis.Redis, refs: list[Ref], shards: int) -> int:
    """Orders whose record, under ``shards``' layout, holds a terminal status."""
    with client.pipeline(transaction=False) as pipe:
        for device, seq in refs:
            pipe.hget(order_key(device, f"o-{device}-{seq:06d}", shards), "status")
        return sum(status in TERMINAL for status in pipe.execute())


def entries(client: redis.Redis, shards: int) -> list[tuple[int, str, str]]:
    """(shard, device, order id) of every stream entry of shards 0..shards-1."""
    found = []
    for shard in range(shards):
        rows: Any = client.xrange(stream_key(shard))
        found += [(shard, f[b"device_id"].decode(), f[b"order_id"].decode()) for _, f in rows]
    return found


def send(publisher: Publisher, refs: list[Ref]) -> None:
    for device, seq in refs:
        publisher.publish(orders_topic(device), encode(make_order(device, seq)))
    publisher.wait_all()


def stock_total(client: redis.Redis, shards: int) -> int:
    return sum(
        int(client.hget(f"pipeline:{{{shard}}}:stock", "COLA-33") or 0) for shard in range(shards)
    )


def fulfilled(client: redis.Redis, refs: list[Ref]) -> int:
    """Units the fulfilled orders among ``refs`` took (one each), read in the 8-shard layout."""
    return sum(
        client.hget(order_key(d, f"o-{d}-{seq:06d}", 8), "status") == b"fulfilled"
        for d, seq in refs
    )


def test_four_to_eight_shards_loses_and_duplicates_nothing(
    mosquitto_factory: Callable[..., MosquittoProcess],
    bridge_factory: BridgeFactory,
    redis_url: str,
    tmp_path: Path,
) -> None:
    """Refused while a bridge runs (nothing touched); after stop + drain it moves every key;
    resends of old orders stay duplicates, new orders land once in their 8-shard stream."""
    broker = mosquitto_factory()
    client = redis.Redis.from_url(redis_url)
    beats = ("--heartbeat-interval-s", "0.3")
    bridge = bridge_factory(broker.url, redis_url, *beats)  # --shards 4
    bridge.start()
    assert pipeline("catalog", "load", str(CATALOG), "--redis-url", redis_url).returncode == 0
    stock_before = stock_total(client, 4)
    devices = [f"dev-rs{index:02d}" for index in range(40)]
    before = [(d, seq) for seq in range(10) for d in devices]
    after = [(d, seq) for seq in range(10, 20) for d in devices]
    publisher = Publisher(broker.url)
    worker = Worker(tmp_path / "worker-1.log", broker.url, redis_url)
    try:
        send(publisher, before)
        wait_until_blocking(lambda: processed(client, before, 4) == len(before), 120,
                            "orders before the change processed", explain=worker.tail)  # fmt: skip

        busy = pipeline("layout", "set", "--shards", "8", "--redis-url", redis_url,
                        "--settle-s", "0.2")  # fmt: skip
        assert busy.returncode == 2, busy.stderr[-2000:]
        assert "bridges still running" in busy.stderr
        assert bridge.client_id in busy.stderr
        assert client.get(MANIFEST_KEY) == Manifest(4).encode().encode()
        assert worker.process.poll() is None  # a refused change stopped nothing

        assert bridge.terminate() == 0
        assert worker.stop() == 0
        change = ("layout", "set", "--shards", "8", "--redis-url", redis_url, "--settle-s", "0.2")
        # Refused (touching nothing) until the stopped bridge's last beat is stale.
        wait_until_blocking(lambda: pipeline(*change).returncode == 0, 60, "change done")
        assert Manifest.decode(client.get(MANIFEST_KEY) or b"").shards == 8
        assert processed(client, before, 8) == len(before)  # records moved with their devices
        assert stock_total(client, 8) == stock_before - fulfilled(client, before)

        adopter = bridge_factory(broker.url, redis_url, *beats)
        adopter.argv.remove("--shards")
        adopter.argv.remove("4")
        adopter.start()
        worker = Worker(tmp_path / "worker-2.log", broker.url, redis_url)
        send(publisher, [*before, *after])
        everything = [*before, *after]
        wait_until_blocking(lambda: processed(client, everything, 8) == len(everything), 120,
                            "every order processed", explain=worker.tail)  # fmt: skip
        assert adopter.terminate() == 0
    finally:
        publisher.close()
        if worker.process.poll() is None:
            worker.stop()
    assert "adopt" in worker.tail()
    new_entries = entries(client, 8)
    counted: dict[tuple[str, str], int] = {}
    for _, device, order_id in new_entries:
        counted[(device, order_id)] = counted.get((device, order_id), 0) + 1
    expected = {(d, f"o-{d}-{seq:06d}") for d, seq in everything}
    assert set(counted) == expected  # 0 lost
    assert [ref for ref, n in counted.items() if n > 1] == []  # 0 duplicated
    later = {(d, f"o-{d}-{seq:06d}") for d, seq in after}
    misplaced = [
        (shard, device)
        for shard, device, order_id in new_entries
        if (device, order_id) in later and shard != shard_of(device, 8)
    ]
    assert misplaced == []
    assert stock_total(client, 8) == stock_before - fulfilled(client, everything)
    client.close()
