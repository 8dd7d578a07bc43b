"""A Redis host power cut under a real bridge's load, with the shipped redis/redis.conf.

Redis keeps its AOF on the power-cut filesystem. Orders stream in through a
real Mosquitto and ``order-bridge``; once more than 1,000 ``accepted`` receipts
were heard, the power is cut (unsynced writes dropped, Redis SIGKILLed) and
Redis restarts on the surviving files. ``appendfsync always`` must lose no
receipted order; ``everysec`` (the same harness) must lose some, which proves
the cut really drops what a SIGKILL alone would keep.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from schemas import encode
from schemas.names import orders_topic
from testrig.powercut import PowerCutMount
from testrig.servers import MosquittoProcess, RedisProcess, find_binary, port_is_open
from tests.bridge.conftest import BridgeProcess, Publisher, ReceiptCollector, stream_entries
from tests.helpers import make_order, wait_until_blocking

from .conftest import needs_fuse

pytestmark = needs_fuse

REDIS_CONF = Path(__file__).resolve().parents[2] / "redis" / "redis.conf"
DEVICES = 50
MAX_UNRECEIPTED = 2_000
RATE = 2_000

BridgeFactory = Callable[..., BridgeProcess]


class ShippedRedis(RedisProcess):
    """redis-server with redis/redis.conf, its data directory on ``data_dir``."""

    def __init__(self, workdir: Path, data_dir: Path, *overrides: str) -> None:
        super().__init__(workdir)
        self.data_dir = data_dir
        self.overrides = overrides

    def command(self) -> list[str]:
        return [
            find_binary("redis-server"), str(REDIS_CONF),
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
            *self.overrides,
        ]  # fmt: skip


@dataclass(frozen=True)
class CutOutcome:
    """Receipts heard before the cut, and which of those orders Redis no longer has."""

    receipted: set[tuple[str, str]]
    lost: set[tuple[str, str]]
    report_bytes: int


def _power_cut_under_load(
    tmp_path: Path,
    broker: MosquittoProcess,
    bridge_factory: BridgeFactory,
    *overrides: str,
    receipts_before_cut: int,
) -> CutOutcome:
    with PowerCutMount(tmp_path / "disk") as disk:
        data_dir = disk.path / "redis"
        data_dir.mkdir()
        store = ShippedRedis(tmp_path / "redis", data_dir, *overrides)
        store.start()
        client = redis.Redis.from_url(store.url)
        expected_fsync = "always" if not overrides else overrides[-1]
        assert client.config_get("appendfsync") == {"appendfsync": expected_fsync}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        bridge = bridge_factory(broker.url, store.url, "--backoff-max-s", "0.2")
        bridge.start()
        collector = ReceiptCollector(broker.url)
        publisher = Publisher(broker.url)
        stop = threading.Event()
        published = [0]

        def feed() -> None:
            # A steady ~2,000 orders/s, so Redis is writing at every instant of the cut.
            seq, started = 0, time.monotonic()
            while not stop.is_set():
                due = int((time.monotonic() - started) * RATE)
                if seq >= due or seq - len(collector.receipts) > MAX_UNRECEIPTED:
                    time.sleep(0.002)
                    continue
                device = f"pc-{seq % DEVICES}"
                publisher.publish(orders_topic(device), encode(make_order(device, seq)))
                seq += 1
                published[0] = seq

        feeder = threading.Thread(target=feed, name="feeder")
        feeder.start()
        try:
            wait_until_blocking(
                lambda: len(collector.receipts) >= receipts_before_cut, 60, "receipts under load"
            )
            # Cut while receipts are flowing (not in a pause between bridge batches).
            heard = len(collector.receipts)
            wait_until_blocking(lambda: len(collector.receipts) > heard, 10, "the next receipt")
            report = disk.cut()
            store.kill()
            assert not port_is_open(store.port)
            stop.set()
            feeder.join(10)
            time.sleep(0.5)  # receipts already on their way through the broker
            receipted = {
                (device, r.order_id)
                for device, r in collector.snapshot()
                if r.result == "accepted" and r.order_id is not None
            }
            assert published[0] > len(receipted)  # the load was still running at the cut
            disk.power_on()
            store.start()
            survived = {
                (e[b"device_id"].decode(), e[b"order_id"].decode()) for e in stream_entries(client)
            }
            return CutOutcome(receipted, receipted - survived, report.dropped_bytes)
        finally:
            stop.set()
            feeder.join(10)
            publisher.close()
            collector.close()
            bridge.stop()
            client.close()
            store.kill()


def test_redis_power_cut_with_the_shipped_config_loses_no_receipted_order(
    tmp_path: Path,
    mosquitto_factory: Callable[..., MosquittoProcess],
    bridge_factory: BridgeFactory,
) -> None:
    """appendfsync always: every order receipted before the cut is in a stream after it."""
    outcome = _power_cut_under_load(
        tmp_path, mosquitto_factory(), bridge_factory, receipts_before_cut=1_500
    )
    assert len(outcome.receipted) >= 1_000
    assert outcome.lost == set()


def test_the_same_cut_with_everysec_loses_receipted_orders(
    tmp_path: Path,
    mosquitto_factory: Callable[..., MosquittoProcess],
    bridge_factory: BridgeFactory,
) -> None:
    """appendfsync everysec: receipted orders vanish, so the cut really drops unsynced writes."""
    outcome = _power_cut_under_load(
        tmp_path,
        mosquitto_factory(),
        bridge_factory,
        "--appendfsync", "everysec",
        receipts_before_cut=400,
    )  # fmt: skip
    assert outcome.report_bytes > 0
    assert outcome.lost, f"nothing lost of {len(outcome.receipted)} receipted orders"
