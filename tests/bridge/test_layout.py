"""Issue 21, finding 2: one shard layout per deployment (servicekit.layout).

A bridge with --shards 4 runs; a replica with --shards 8 and a pipeline with
--shards 2 start against the same Redis. Before the manifest they ran, and
orders landed outside the layout, twice, or were never processed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from pipeline.names import order_key
from schemas import encode
from schemas.names import MANIFEST_KEY, PIPELINE_GROUP, orders_topic, shard_of, stream_key
from servicekit.layout import Manifest
from testrig.servers import MosquittoProcess
from tests.bridge.conftest import BridgeProcess, Publisher
from tests.helpers import make_order, wait_until_blocking

BridgeFactory = Callable[..., BridgeProcess]
ROOT = Path(__file__).resolve().parents[2]
CATALOG = ROOT / "pipeline" / "demo_catalog.toml"
TERMINAL = {b"fulfilled", b"rejected", b"failed"}


def pipeline_cmd(command: str, mqtt_url: str, redis_url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", command, "--mqtt-url", mqtt_url,
            "--redis-url", redis_url, "--log-level", "info", *extra]  # fmt: skip


def refused(argv: list[str], timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a service that must refuse to start; it must exit by itself."""
    return subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False
    )


def test_a_mismatched_replica_and_pipeline_refuse_and_every_order_lands_once(
    mosquitto_factory: Callable[..., MosquittoProcess],
    bridge_factory: BridgeFactory,
    redis_url: str,
    tmp_path: Path,
) -> None:
    """4/8/2: the --shards 8 replica and the --shards 2 pipeline exit 2 naming both counts and
    the fix; a replica and a pipeline without --shards adopt 4; 1,000 orders from 40 devices
    (each sent twice) end exactly once in their 4-shard stream, none elsewhere, all processed."""
    broker = mosquitto_factory()
    group = "g-layout"
    first = bridge_factory(broker.url, redis_url, "--share-group", group)  # --shards 4
    first.start()
    client = redis.Redis.from_url(redis_url)
    stored = client.get(MANIFEST_KEY)
    assert stored is not None
    assert Manifest.decode(stored).shards == 4

    wrong = bridge_factory(broker.url, redis_url, "--share-group", group, "--shards", "8")
    bridge_run = refused(wrong.argv)
    assert bridge_run.returncode == 2, bridge_run.stderr[-2000:]
    assert "--shards 8 does not match this deployment's 4 shards" in bridge_run.stderr
    assert "order-pipeline layout set --shards 8" in bridge_run.stderr

    pipeline_run = refused(pipeline_cmd("worker", broker.url, redis_url, "--shards", "2"))
    assert pipeline_run.returncode == 2, pipeline_run.stderr[-2000:]
    assert "--shards 2 does not match this deployment's 4 shards" in pipeline_run.stderr
    assert Manifest.decode(client.get(MANIFEST_KEY) or b"").shards == 4  # untouched

    adopter = bridge_factory(broker.url, redis_url, "--share-group", group)
    adopter.argv.remove("--shards")
    adopter.argv.remove("4")
    adopter.start()
    assert "adopting the deployment's shard count" in adopter.log_tail(100)

    loaded = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "catalog", "load", str(CATALOG),
         "--redis-url", redis_url],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert client.hget("pipeline:catalog:meta", "shards") in {b"4", None}

    devices = [f"dev-lay{index:02d}" for index in range(40)]
    orders = [(d, seq) for seq in range(25) for d in devices]
    publisher = Publisher(broker.url)
    worker_log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        pipeline_cmd("worker", broker.url, redis_url, "--block-ms", "100"),
        cwd=ROOT, stdout=worker_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        for device, seq in [*orders, *orders]:
            publisher.publish(orders_topic(device), encode(make_order(device, seq)))
        publisher.wait_all()

        def processed() -> int:
            with client.pipeline(transaction=False) as pipe:
                for device, seq in orders:
                    pipe.hget(order_key(device, f"o-{device}-{seq:06d}", 4), "status")
                return sum(status in TERMINAL for status in pipe.execute())

        worker_tail = lambda: (tmp_path / "worker.log").read_text()[-3000:]  # noqa: E731
        wait_until_blocking(
            lambda: processed() == len(orders), 120, "every order processed", explain=worker_tail
        )
    finally:
        publisher.close()
        worker.terminate()
        worker.wait(30)
        worker_log.close()
    assert worker.returncode == 0
    assert "adopt" in (tmp_path / "worker.log").read_text()

    seen: dict[tuple[str, str], int] = {}
    misplaced = 0
    for shard in range(4):
        rows: Any = client.xrange(stream_key(shard))  # redis-py types the rows as optional
        for _, fields in rows:
            device = fields[b"device_id"].decode()
            key = (device, fields[b"order_id"].decode())
            seen[key] = seen.get(key, 0) + 1
            misplaced += shard_of(device, 4) != shard
    expected = {(d, f"o-{d}-{seq:06d}") for d, seq in orders}
    assert misplaced == 0
    assert set(seen) == expected  # 0 lost
    assert [k for k, n in seen.items() if n > 1] == []  # 0 duplicated
    assert [k.decode() for k in client.scan_iter("orders:{[4-7]}*")] == []  # nothing outside
    for shard in range(4):
        info = client.xinfo_groups(stream_key(shard))
        group_info = next(g for g in info if g["name"] == PIPELINE_GROUP.encode())
        assert group_info["pending"] == 0
    assert first.terminate() == 0
    assert adopter.terminate() == 0
    client.close()


def test_a_manifest_changed_under_a_running_bridge_stops_it(
    mosquitto_factory: Callable[..., MosquittoProcess],
    bridge_factory: BridgeFactory,
    redis_url: str,
) -> None:
    """The watch: a manifest that now says 8 shards ends a 4-shard bridge (exit 1, logged)."""
    bridge = bridge_factory(mosquitto_factory().url, redis_url)
    bridge.start()
    with redis.Redis.from_url(redis_url) as client:
        client.set(MANIFEST_KEY, Manifest(8).encode())
    assert bridge.process is not None
    deadline = time.monotonic() + 30
    while bridge.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert bridge.process.returncode == 1, bridge.log_tail()
    assert "layout changed under this service" in bridge.log_tail(100)


@pytest.mark.parametrize("raw", [b"garbage", b'{"shards": 0, "contract": "v1"}'])
def test_a_bad_manifest_refuses(
    mosquitto_factory: Callable[..., MosquittoProcess],
    bridge_factory: BridgeFactory,
    redis_url: str,
    raw: bytes,
) -> None:
    """A manifest nobody can read is not overwritten: the bridge refuses (exit 2)."""
    with redis.Redis.from_url(redis_url) as client:
        client.set(MANIFEST_KEY, raw)
        run = refused(bridge_factory(mosquitto_factory().url, redis_url).argv)
        assert run.returncode == 2, run.stderr[-2000:]
        assert MANIFEST_KEY in run.stderr
        assert client.get(MANIFEST_KEY) == raw


def test_a_change_starting_under_a_running_worker_stops_it(
    mosquitto_factory: Callable[..., MosquittoProcess], redis_url: str, tmp_path: Path
) -> None:
    """A worker that adopted 4 shards exits 1 once `layout set` marks a change to 8, and a
    new one refuses to start (exit 2) while the change is in progress."""
    broker = mosquitto_factory()
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as out:
        worker = subprocess.Popen(
            pipeline_cmd("worker", broker.url, redis_url, "--block-ms", "100"),
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            client = redis.Redis.from_url(redis_url)
            wait_until_blocking(lambda: client.get(MANIFEST_KEY) is not None, 30, "manifest")
            wait_until_blocking(lambda: "worker_started" in log_path.read_text(), 30, "started")
            client.set(MANIFEST_KEY, Manifest(16, changing_to=8).encode())
            assert worker.wait(30) == 1
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert "layout changed under this service" in log_path.read_text()
    again = refused(pipeline_cmd("worker", broker.url, redis_url))
    assert again.returncode == 2
    assert "being changed from 16 to 8" in again.stderr
    client.close()
