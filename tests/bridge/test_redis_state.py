"""What the bridge says about its Redis, and what it does when Redis can't keep a promise.

Real Redis processes with the shipped redis/redis.conf: durability in /readyz
and /metrics; a wrong or missing password is loud and red; at maxmemory the
bridge stops acknowledging and recovers by itself; with --redis-min-replicas
it acknowledges only what a real replica holds.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from schemas import encode
from schemas.names import orders_topic
from testrig.servers import MosquittoProcess, RedisProcess, port_is_open
from tests.bridge.conftest import BridgeProcess, Publisher, ReceiptCollector, stream_entries
from tests.helpers import make_order, wait_until_blocking

BridgeFactory = Callable[..., BridgeProcess]


def readyz(bridge: BridgeProcess) -> dict[str, Any]:
    """The JSON body of ``/readyz`` (200 or 503)."""
    url = f"http://127.0.0.1:{bridge.http_port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            body: dict[str, Any] = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read())
    except OSError:
        body = {}  # not listening yet
    return body


def metric(bridge: BridgeProcess, name: str) -> float | None:
    """One sample of ``/metrics``, None when absent (or not served yet)."""
    try:
        page = bridge.metrics()
    except OSError:
        return None
    match = re.search(rf"^{re.escape(name)} (\S+)$", page, re.MULTILINE)
    return float(match.group(1)) if match else None


def fill_until_full(client: redis.Redis) -> int:
    """SET 100 kB fillers until Redis answers OOM; returns how many it took."""
    for index in range(1000):
        try:
            client.set(f"filler:{index}", b"x" * 100_000)
        except redis.exceptions.OutOfMemoryError:
            return index
    raise AssertionError("Redis never filled up")


def production_redis(tmp_path: Path, name: str, **kwargs: Any) -> RedisProcess:
    """A Redis started from redis/redis.conf (stopped by the caller)."""
    server = RedisProcess.production(tmp_path / name, **kwargs)
    server.start()
    return server


def test_durable_redis_is_reported_ready(
    tmp_path: Path,
    mosquitto_factory: Callable[..., MosquittoProcess],
    bridge_factory: BridgeFactory,
) -> None:
    """redis/redis.conf: /readyz green with redis_durable true, metric 1, appendfsync always."""
    server = production_redis(tmp_path, "redis")
    try:
        bridge = bridge_factory(mosquitto_factory().url, server.url, "--redis-require-durable")
        bridge.start()
        body = readyz(bridge)
        assert body["ok"] is True
        assert body["checks"]["redis_durable"] is True
        assert body["redis_durable"] is True
        assert body["redis"]["appendfsync"] == "always"
        assert body["redis"]["aof_enabled"] is True
        assert metric(bridge, "bridge_redis_durable") == 1.0
        assert metric(bridge, "bridge_ready") == 1.0
    finally:
        server.kill()


def test_everysec_redis_is_loud_and_not_ready(
    tmp_path: Path,
    mosquitto_factory: Callable[..., MosquittoProcess],
    bridge_factory: BridgeFactory,
) -> None:
    """AOF with appendfsync everysec: /readyz red (redis_durable false), metric 0, an error line."""
    server = production_redis(tmp_path, "redis", appendfsync="everysec")
    try:
        bridge = bridge_factory(mosquitto_factory().url, server.url, "--redis-require-durable")
        bridge.start(wait_ready=False)
        wait_until_blocking(
            lambda: readyz(bridge).get("redis", {}).get("appendfsync"), 30, "inspected"
        )
        assert bridge.status("/readyz") == 503
        body = readyz(bridge)
        assert body["checks"]["redis_durable"] is False
        assert body["redis"]["appendfsync"] == "everysec"
        assert metric(bridge, "bridge_redis_durable") == 0.0
        assert metric(bridge, "bridge_ready") == 0.0  # what the BridgeNotReady alert watches
        wait_until_blocking(
            lambda: "REDIS IS NOT DURABLE" in bridge.log_tail(50), 10, "the loud log line"
        )
        assert bridge.status("/healthz") == 200  # alive; it just must not be trusted
    finally:
        server.kill()


@pytest.mark.parametrize("credentials", ["wrong:password@", ""], ids=["wrong", "missing"])
def test_wrong_or_missing_password_is_loud_and_red(
    tmp_path: Path,
    mosquitto_factory: Callable[..., MosquittoProcess],
    bridge_factory: BridgeFactory,
    credentials: str,
) -> None:
    """Redis refuses the credentials: an error line, /readyz red on redis_auth, no receipts."""
    server = production_redis(tmp_path, "redis", extra_args=("--requirepass", "s3cret"))
    broker = mosquitto_factory()
    receipts = ReceiptCollector(broker.url)
    publisher = Publisher(broker.url)
    try:
        url = f"redis://{credentials}127.0.0.1:{server.port}/0"
        bridge = bridge_factory(broker.url, url)
        bridge.start(wait_ready=False)
        wait_until_blocking(lambda: bridge.status("/readyz") == 503, 30, "red readiness")
        wait_until_blocking(
            lambda: "REDIS REFUSED OUR CREDENTIALS" in bridge.log_tail(50), 10, "loud line"
        )
        body = readyz(bridge)
        assert body["checks"]["redis_auth"] is False
        assert metric(bridge, "bridge_redis_auth_ok") == 0.0
        # The layout's wait logs NOT READY, the Redis probe the refusal: two tasks, either first.
        wait_until_blocking(lambda: "NOT READY" in bridge.log_tail(200), 30, "NOT READY line")
        assert '"msg": "bridge running"' not in bridge.log_tail(200)
        publisher.publish(orders_topic("dev-auth"), encode(make_order("dev-auth", 0)))
        publisher.wait_all()
        time.sleep(1.0)
        assert receipts.snapshot() == []  # nothing acknowledged that Redis did not take

        fixed = bridge_factory(broker.url, f"redis://:s3cret@127.0.0.1:{server.port}/0")
        fixed.start()
        assert readyz(fixed)["checks"]["redis_auth"] is True
    finally:
        publisher.close()
        receipts.close()
        server.kill()


def test_full_redis_stops_acks_and_recovers_by_itself(
    tmp_path: Path,
    mosquitto_factory: Callable[..., MosquittoProcess],
    bridge_factory: BridgeFactory,
) -> None:
    """At maxmemory (noeviction): no receipt, /readyz red; memory freed: all land once, no crash."""
    server = production_redis(tmp_path, "redis", maxmemory="64mb")
    broker = mosquitto_factory()
    receipts = ReceiptCollector(broker.url)
    publisher = Publisher(broker.url)
    admin = redis.Redis.from_url(server.url)
    devices = [f"dev-oom-{index}" for index in range(5)]
    try:
        bridge = bridge_factory(broker.url, server.url, "--redis-require-durable",
                                "--backoff-max-s", "0.2")  # fmt: skip
        bridge.start()
        first = [(d, encode(make_order(d, seq))) for seq in range(10) for d in devices]
        for device, payload in first:
            publisher.publish(orders_topic(device), payload)
        publisher.wait_all()
        wait_until_blocking(lambda: len(receipts.snapshot()) == len(first), 30, "first receipts")

        # Fill Redis up to a limit 2 MB above what it holds now, then settle the limit
        # half way: what it holds without the fillers fits, what it holds now doesn't.
        used = int(admin.info("memory")["used_memory"])
        admin.config_set("maxmemory", used + 2_000_000)
        fillers = fill_until_full(admin)
        admin.config_set("maxmemory", used + 1_000_000)
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            admin.set("proof", b"1")  # the fault really happened
        full = [(d, encode(make_order(d, seq))) for seq in range(10, 30) for d in devices]
        for device, payload in full:
            publisher.publish(orders_topic(device), payload)
        publisher.wait_all()
        wait_until_blocking(lambda: bridge.status("/readyz") == 503, 10, "red readiness")
        body = readyz(bridge)
        assert body["checks"]["redis_writable"] is False
        wait_until_blocking(lambda: metric(bridge, "bridge_redis_full") == 1.0, 10, "full metric")
        time.sleep(1.0)
        assert len(receipts.snapshot()) == len(first), "acknowledged while Redis was full"
        assert "REDIS IS FULL" in bridge.log_tail(100)

        admin.delete(*[f"filler:{index}" for index in range(fillers)])  # nobody tells the bridge
        wait_until_blocking(
            lambda: len(receipts.snapshot()) >= len(first) + len(full), 30, "the held orders"
        )
        wait_until_blocking(lambda: bridge.status("/readyz") == 200, 10, "green again")
        assert bridge.process is not None
        assert bridge.process.poll() is None
        seen = Counter(
            (f[b"device_id"].decode(), f[b"order_id"].decode()) for f in stream_entries(admin)
        )
        expected = {(d, f"o-{d}-{seq:06d}") for seq in range(30) for d in devices}
        assert set(seen) == expected
        assert max(seen.values()) == 1
        assert {r.result for _d, r in receipts.snapshot()} == {"accepted"}
    finally:
        admin.close()
        publisher.close()
        receipts.close()
        server.kill()


def test_min_replicas_acks_only_what_a_replica_holds(
    tmp_path: Path,
    mosquitto_factory: Callable[..., MosquittoProcess],
    bridge_factory: BridgeFactory,
) -> None:
    """--redis-min-replicas 1: receipts while the replica runs; none without it; all once after."""
    primary = production_redis(tmp_path, "primary")
    replica_args = ("--replicaof", "127.0.0.1", str(primary.port))
    replica = production_redis(tmp_path, "replica", extra_args=replica_args)
    broker = mosquitto_factory()
    receipts = ReceiptCollector(broker.url)
    publisher = Publisher(broker.url)
    admin = redis.Redis.from_url(primary.url)
    try:
        wait_until_blocking(
            lambda: admin.info("replication")["connected_slaves"] == 1, 30, "replica link"
        )
        bridge = bridge_factory(broker.url, primary.url, "--redis-min-replicas", "1",
                                "--redis-replica-timeout-ms", "200", "--backoff-max-s", "0.2",
                                "--redis-require-durable")  # fmt: skip
        bridge.start()
        publisher.publish(orders_topic("dev-rep"), encode(make_order("dev-rep", 0)))
        publisher.wait_all()
        wait_until_blocking(lambda: len(receipts.snapshot()) == 1, 30, "receipt with a replica")

        replica.kill()
        assert not port_is_open(replica.port)
        wait_until_blocking(
            lambda: admin.info("replication")["connected_slaves"] == 0, 30, "replica gone"
        )
        for seq in range(1, 6):
            publisher.publish(orders_topic("dev-rep"), encode(make_order("dev-rep", seq)))
        publisher.wait_all()
        time.sleep(1.5)
        assert len(receipts.snapshot()) == 1, "acknowledged without a replica"
        # The batch in flight is on the primary, not yet acknowledged (with group commit
        # the first order after the kill goes alone; the rest wait behind it, unacked).
        assert 2 <= len(stream_entries(admin)) <= 6

        replica.start()
        wait_until_blocking(
            lambda: len(receipts.snapshot()) == 6, 30, "receipts once the replica is back"
        )
        assert {r.result for _d, r in receipts.snapshot()} == {"accepted"}
        with redis.Redis.from_url(replica.url) as copy:
            assert len(stream_entries(copy)) == 6
    finally:
        admin.close()
        publisher.close()
        receipts.close()
        replica.kill()
        primary.kill()


@pytest.mark.parametrize("grant_info", [True, False], ids=["info", "no-info"])
def test_acl_hiding_appendfsync_is_unknown_unless_the_operator_vouches(
    tmp_path: Path,
    mosquitto_factory: Callable[..., MosquittoProcess],
    bridge_factory: BridgeFactory,
    grant_info: bool,
) -> None:
    """A bridge user without CONFIG GET: durability unknown (-1), red; vouched for: green."""
    server = production_redis(tmp_path, "redis")
    broker = mosquitto_factory()
    with redis.Redis.from_url(server.url) as admin:
        admin.acl_setuser(
            "bridge", enabled=True, passwords=["+pw"], keys=["orders:*", "deployment:*"],
            commands=["-@all", "+ping", "+evalsha", "+script|load", "+xadd", "+xtrim",
                      "+xinfo|groups", "+xpending", "+set", "+get", "+exists", "+wait", "+incr",
                      *(["+info"] if grant_info else [])],
        )  # fmt: skip
        with pytest.raises(redis.exceptions.NoPermissionError):
            redis.Redis(port=server.port, username="bridge", password="pw").config_get(
                "appendfsync"
            )
    url = f"redis://bridge:pw@127.0.0.1:{server.port}/0"
    try:
        unknown = bridge_factory(broker.url, url, "--redis-require-durable")
        unknown.start(wait_ready=False)
        wait_until_blocking(
            lambda: metric(unknown, "bridge_redis_durable") == -1.0, 30, "durability unknown"
        )
        assert unknown.status("/readyz") == 503
        assert readyz(unknown)["checks"]["redis_durable"] is False
        vouched = bridge_factory(broker.url, url, "--redis-require-durable",
                                 "--redis-assume-fsync-always")  # fmt: skip
        vouched.start()
        assert readyz(vouched)["redis_durable"] is True
        assert metric(vouched, "bridge_redis_durable") == -1.0
    finally:
        server.kill()
