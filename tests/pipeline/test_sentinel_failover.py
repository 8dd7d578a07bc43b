"""The pipeline's loops outlive a Sentinel failover that demotes the old master, unrestarted.

A planned failover (``SENTINEL FAILOVER``) promotes the replica at once and leaves
the old master running: it stays a master until the Sentinels turn it into a replica
of the new one (about 10 s later on Redis 7.0), and every connection a service pooled
to it then answers writes with READONLY, which redis-py turns into a ConnectionError
and a new Sentinel look-up. Every part of ``order-pipeline run`` that talks to Redis
is used on the old master first (worker, status query responder, health consumer,
orders API), so each holds pooled connections to it when it is demoted; after the
demotion, with the same worker processes, each must work on the new master.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import redis
from paho.mqtt.enums import CallbackAPIVersion

from pipeline.config import PipelineConfig
from pipeline.names import health_device_key
from schemas import Health, StatusQuery, decode_status, encode
from schemas.names import health_topic, shard_of, status_query_topic, status_topic, stream_key
from servicekit.clock import now_ms
from testrig.sentinel import MASTER_NAME, SentinelGroup, role
from testrig.servers import MosquittoProcess, free_port
from testrig.services import child_pids
from tests.bridge.conftest import Publisher, close_paho
from tests.bridge.failover_rig import SHARDS, processed
from tests.helpers import make_order, wait_until_blocking
from tests.pipeline.processes import env_for, spawn, stop_all
from tests.tools import require_tool

DEVICES = ("sf-a", "sf-b", "sf-c")


class Statuses:
    """A paho subscriber on the devices' status topics: which orders were answered."""

    def __init__(self, broker: MosquittoProcess) -> None:
        self.heard: set[str] = set()
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *_: subscribed.set()
        self._client.connect("127.0.0.1", broker.port)
        self._client.loop_start()
        self._client.subscribe([(status_topic(d), 1) for d in DEVICES])
        assert subscribed.wait(10), "no SUBACK"

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.heard.add(decode_status(msg.payload).order_id)

    def clear(self) -> None:
        with self._lock:
            self.heard.clear()

    def answered(self) -> set[str]:
        with self._lock:
            return set(self.heard)

    def close(self) -> None:
        close_paho(self._client)


def produce(port: int, orders: list[str]) -> None:
    """XADD each order (``o-{device}-{seq}``) as the bridge would, to the node on ``port``."""
    with redis.Redis(port=port) as client:
        for order_id in orders:
            device, seq = order_id[2:].rsplit("-", 1)
            order = make_order(device, int(seq))
            client.xadd(
                stream_key(shard_of(device, SHARDS)),
                {"order_id": order_id, "device_id": device, "seq": int(seq),
                 "received_at": now_ms(), "payload": encode(order)},
            )  # fmt: skip


def batch(first: int, count: int = 12) -> list[str]:
    return [f"o-{DEVICES[i % len(DEVICES)]}-{first + i:06d}" for i in range(count)]


def get_order(port: int, order_id: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/orders/{order_id}", timeout=5) as r:
        body: dict[str, Any] = json.loads(r.read())
    return body


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    require_tool("redis-server")
    with SentinelGroup(tmp_path / "sentinel", replicas=1) as started:
        yield started


def test_pipeline_works_on_after_a_failover_demotes_its_master(
    tmp_path: Path,
    group: SentinelGroup,
    mosquitto_factory: Callable[..., MosquittoProcess],
) -> None:
    """Worker, status queries, health and API each use the old master, then the new one."""
    broker = mosquitto_factory()
    old = group.master.port
    api_port = free_port()
    config = PipelineConfig(
        redis_url="redis://127.0.0.1:9/0",  # the discard port: only a Sentinel look-up works
        redis_sentinel=tuple(group.sentinel_addresses), redis_sentinel_master=MASTER_NAME,
        mqtt_url=broker.url, shards=SHARDS, workers=1, http_port=api_port,
        block_ms=100, claim_idle_ms=1000,
    )  # fmt: skip
    pipeline = spawn(["run"], env_for(config), tmp_path / "pipeline.log")
    statuses = Statuses(broker)
    publisher = Publisher(broker.url)
    new_master = redis.Redis(port=old)  # re-pointed after the promotion

    def done(orders: list[str]) -> Callable[[], bool]:
        return lambda: processed(new_master, orders) == set(orders)

    def use_every_loop(orders: list[str], label: str, depth: int) -> None:
        """Process ``orders``, then ask their statuses, report health (an outbox depth of
        ``depth``), read one by the API."""
        wait_until_blocking(done(orders), 60, f"{label}: orders processed")
        statuses.clear()
        for device in DEVICES:
            mine = tuple(o for o in orders if o.startswith(f"o-{device}-"))
            publisher.publish(status_query_topic(device), encode(StatusQuery(v=1, order_ids=mine)))
            health = Health(v=1, online=True, at=now_ms(), outbox_depth=depth)
            publisher.publish(health_topic(device), encode(health))
        publisher.wait_all()
        wait_until_blocking(lambda: statuses.answered() >= set(orders), 30, f"{label}: answers")
        wait_until_blocking(
            lambda: all(
                new_master.hget(health_device_key(d), "outbox_depth") == str(depth).encode()
                for d in DEVICES
            ),
            30,
            f"{label}: health stored",
        )
        assert get_order(api_port, orders[-1])["order_id"] == orders[-1]

    try:
        wait_until_blocking(lambda: child_pids(pipeline.pid) != [], 60, "the worker started")
        workers = sorted(child_pids(pipeline.pid))
        first = batch(0)
        produce(old, first)
        use_every_loop(first, "before", 1)
        with redis.Redis(port=old) as client:
            assert client.execute_command("WAIT", 1, 5000) == 1  # the replica has it all

        with redis.Redis(port=group.sentinels[0].port) as sentinel:
            sentinel.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        wait_until_blocking(
            lambda: (
                group.master_port() not in {None, old}
                and role(group.master_port() or 0) == "master"
            ),
            30,
            "the replica promoted",
        )
        new_port = group.master_port()
        assert new_port is not None
        new_master.close()
        new_master = redis.Redis(port=new_port)
        during = batch(100)  # written to the new master while the old one still serves
        produce(new_port, during)
        promoted_at = time.monotonic()
        wait_until_blocking(lambda: role(old) == "slave", 60, "the old master demoted")
        print(f"\nold master demoted {time.monotonic() - promoted_at:.1f} s after the promotion")
        assert group.master_port() == new_port

        after = batch(200)
        produce(new_port, after)
        wait_until_blocking(done(during), 60, "orders written during the failover processed")
        use_every_loop(after, "after", 2)
        assert processed(new_master, first) == set(first)  # nothing lost by the move
        assert pipeline.poll() is None, "the pipeline exited"
        assert sorted(child_pids(pipeline.pid)) == workers, "a worker was restarted"
    finally:
        new_master.close()
        publisher.close()
        statuses.close()
        for pid in child_pids(pipeline.pid):  # the workers first: an orphan retries for ever
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stop_all([pipeline])
