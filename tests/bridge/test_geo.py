"""Geo mode with real parts: two regions, each a Mosquitto, a Redis on redis/redis.conf and a
real ``order-bridge`` subprocess; bridge B reaches region A's Redis through a TCP proxy that can
blackhole (a partition, not a reset)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis

from schemas import Item, Order, Reason, Receipt, encode
from testrig.proxy import ProxyThread, TcpProxy
from testrig.servers import REDIS_CONF, MosquittoProcess, RedisProcess, port_is_open
from tests.helpers import wait_until_blocking

from .conftest import BridgeProcess, Publisher, ReceiptCollector, stream_entries

REGION_TIMEOUT_S = 0.5
BREAKER_OPEN_S = 1.0
RECEIVE_MAXIMUM = 20


def geo_order(device_id: str, order_id: str, *attempts: str) -> bytes:
    """An encoded valid order with ``attempts``."""
    return encode(
        Order(
            v=1,
            order_id=order_id,
            device_id=device_id,
            seq=1,
            created_at=1_700_000_000_000,
            currency="EUR",
            items=(Item(sku="cola", qty=2, unit_price=150),),
            total=300,
            attempts=attempts,
        )
    )


@dataclass
class Region:
    """One region of the rig."""

    name: str
    broker: MosquittoProcess
    redis_server: RedisProcess
    bridge: BridgeProcess
    receipts: ReceiptCollector
    publisher: Publisher

    def client(self) -> redis.Redis:
        """A client of this region's Redis."""
        return redis.Redis.from_url(self.redis_server.url)

    def entries(self, device_id: str) -> list[dict[bytes, bytes]]:
        """This region's stream entries of one device."""
        with self.client() as client:
            return [e for e in stream_entries(client) if e[b"device_id"] == device_id.encode()]

    def send(self, device_id: str, payload: bytes) -> None:
        """Publish one order to this region's broker at QoS 1."""
        self.publisher.publish(f"v1/devices/{device_id}/orders", payload)
        self.publisher.wait_all(10)

    def receipt(self, order_id: str, count: int = 1, timeout_s: float = 15) -> Receipt:
        """The ``count``-th receipt for ``order_id`` on this region's broker."""

        def found() -> list[Receipt]:
            return [r for _, r in self.receipts.snapshot() if r.order_id == order_id]

        wait_until_blocking(
            lambda: len(found()) >= count,
            timeout_s,
            f"receipt {count} for {order_id}; bridge {self.name}:\n{self.bridge.log_tail()}",
        )
        return found()[count - 1]

    def readyz(self) -> tuple[int, dict[str, Any]]:
        """``/readyz`` of this region's bridge: status and body."""
        url = f"http://127.0.0.1:{self.bridge.http_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return int(response.status), json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def breaker(self, remote: str) -> str:
        """The breaker state this region's bridge reports for ``remote``."""
        return str(self.readyz()[1]["regions"][remote]["breaker"])


@dataclass
class Rig:
    """Regions ``a`` and ``b``; B reaches A's Redis through ``proxy``."""

    a: Region
    b: Region
    proxy: TcpProxy

    def heal(self) -> None:
        """Put the rig back the way the tests expect it: everything up, breakers closed."""
        self.proxy.set_blackhole(False)
        if not self.a.redis_server.running:
            self.a.redis_server.start()
        wait_until_blocking(lambda: self.b.breaker("a") == "closed", 15, "B's breaker for A closed")


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """Two regions with real brokers, Redis (redis/redis.conf) and bridges."""
    root: Path = tmp_path_factory.mktemp("geo")
    servers: list[MosquittoProcess | RedisProcess] = []
    for name in ("a", "b"):
        servers.append(MosquittoProcess(root / f"mqtt-{name}"))
        servers.append(RedisProcess(root / f"redis-{name}", conf=REDIS_CONF))
    for server in servers:
        server.start()
    mqtt_a, redis_a, mqtt_b, redis_b = servers
    assert isinstance(redis_a, RedisProcess)
    assert isinstance(redis_b, RedisProcess)
    assert isinstance(mqtt_a, MosquittoProcess)
    assert isinstance(mqtt_b, MosquittoProcess)
    proxied = ProxyThread("127.0.0.1", redis_a.port)
    via_proxy = f"redis://127.0.0.1:{proxied.proxy.port}/0"
    geo_flags = (
        "--region-timeout-s", str(REGION_TIMEOUT_S), "--region-breaker-failures", "2",
        "--region-breaker-open-s", str(BREAKER_OPEN_S), "--redis-require-durable",
        # Small, so a burst makes the bridge pause its reads: cross-region answers must resume them.
        "--receive-maximum", str(RECEIVE_MAXIMUM),
    )  # fmt: skip
    bridge_a = BridgeProcess(
        root, mqtt_a.url, redis_a.url, "--region", "a",
        "--region-redis", f"a={redis_a.url}", "--region-redis", f"b={redis_b.url}", *geo_flags,
    )  # fmt: skip
    bridge_b = BridgeProcess(
        root, mqtt_b.url, "redis://127.0.0.1:1/0", "--region", "b",  # --redis-url is overridden
        "--region-redis", f"a={via_proxy}", "--region-redis", f"b={redis_b.url}", *geo_flags,
    )  # fmt: skip
    regions: list[Region] = []
    try:
        for name, broker, store, bridge in (
            ("a", mqtt_a, redis_a, bridge_a),
            ("b", mqtt_b, redis_b, bridge_b),
        ):
            bridge.start()
            receipts = ReceiptCollector(broker.url)
            regions.append(Region(name, broker, store, bridge, receipts, Publisher(broker.url)))
        yield Rig(regions[0], regions[1], proxied.proxy)
        # Geo mode adds writer and probe tasks: SIGTERM must still end each bridge cleanly.
        assert bridge_b.terminate(30) == 0, bridge_b.log_tail()
        assert bridge_a.terminate(30) == 0, bridge_a.log_tail()
    finally:
        for region in regions:
            region.publisher.close()
            region.receipts.close()
        bridge_a.stop()
        bridge_b.stop()
        proxied.close()
        for server in servers:
            server.kill()


@pytest.fixture
def geo(rig: Rig) -> Iterator[Rig]:
    """The shared rig, healed after each test."""
    yield rig
    rig.heal()


def _device() -> str:
    return f"dev-{uuid.uuid4().hex[:12]}"


def test_an_order_owned_by_a_sent_to_b_lands_in_a_only_and_its_resend_is_a_duplicate(
    geo: Rig,
) -> None:
    """attempts=[a] at B: one entry in A's Redis, none in B's; a resend with [a, b] is duplicate."""
    device = _device()
    first = geo_order(device, "order-a-0001", "a")
    geo.b.send(device, first)
    assert geo.b.receipt("order-a-0001").result == "accepted"
    entries = geo.a.entries(device)
    assert len(entries) == 1
    assert entries[0][b"payload"] == first  # the bytes as received, attempts included
    assert geo.b.entries(device) == []

    geo.b.send(device, geo_order(device, "order-a-0001", "a", "b"))
    again = geo.b.receipt("order-a-0001", count=2)
    assert (again.result, again.reason) == ("duplicate", None)
    # And at home, too: the longer attempts list is still the same order.
    geo.a.send(device, geo_order(device, "order-a-0001", "a", "b"))
    assert geo.a.receipt("order-a-0001").result == "duplicate"
    assert len(geo.a.entries(device)) == 1
    assert geo.b.entries(device) == []
    assert 'bridge_region_orders_total{region="a",result="accepted"}' in geo.b.bridge.metrics()


def test_a_burst_of_cross_region_orders_beyond_the_in_flight_limit_is_all_answered(
    geo: Rig,
) -> None:
    """5 × Receive Maximum orders owned by A at B: the bridge pauses reads, and the remote
    writer's answers resume them (not only local writes): every order accepted, once."""
    device = _device()
    count = 5 * RECEIVE_MAXIMUM
    for n in range(count):
        geo.b.publisher.publish(
            f"v1/devices/{device}/orders", geo_order(device, f"burst-{n:05d}", "a")
        )
    geo.b.publisher.wait_all(30)
    for n in range(count):
        assert geo.b.receipt(f"burst-{n:05d}", timeout_s=30).result == "accepted"
    assert len(geo.a.entries(device)) == count
    assert geo.b.entries(device) == []


def test_region_unaware_and_home_orders_stay_in_the_receiving_region(geo: Rig) -> None:
    """No attempts (today's agent) and attempts=[b] at B both land in B's Redis only."""
    device = _device()
    geo.b.send(device, encode_plain(device, "plain-0001"))
    geo.b.send(device, geo_order(device, "home-b-0001", "b"))
    assert geo.b.receipt("plain-0001").result == "accepted"
    assert geo.b.receipt("home-b-0001").result == "accepted"
    assert sorted(e[b"order_id"] for e in geo.b.entries(device)) == [b"home-b-0001", b"plain-0001"]
    assert geo.a.entries(device) == []


def encode_plain(device_id: str, order_id: str) -> bytes:
    """An order as a single-region agent sends it: no ``attempts`` key at all."""
    payload = geo_order(device_id, order_id)
    assert b"attempts" not in payload
    return payload


def test_an_unknown_authority_is_pending_and_written_nowhere(geo: Rig) -> None:
    """attempts=[zz]: `pending` unknown_region (never rejected), no DLQ entry, no stream entry
    anywhere; the metric, /readyz and the log name the region."""
    device = _device()
    payload = geo_order(device, "nowhere-0001", "zz", "b")
    geo.b.send(device, payload)
    receipt = geo.b.receipt("nowhere-0001")
    assert (receipt.result, receipt.reason) == ("pending", Reason.UNKNOWN_REGION)
    with geo.b.client() as client:
        assert [f for _, f in client.xrange("orders:dlq") if f[b"payload"] == payload] == []
    assert geo.a.entries(device) == []
    assert geo.b.entries(device) == []
    assert 'bridge_region_unknown_total{region="zz"} 1.0' in geo.b.bridge.metrics()
    assert "zz" in geo.b.readyz()[1]["unknown_regions"]
    wait_until_blocking(
        lambda: '"region": "zz"' in geo.b.bridge.log_tail(200), 5, "a log line naming zz"
    )


def test_authority_redis_down_answers_pending_opens_the_breaker_and_recovers(geo: Rig) -> None:
    """A's Redis killed: orders owned by A get `pending` and are written nowhere, the breaker
    opens, B stays ready and keeps taking its own orders; after A's Redis returns the breaker
    closes and the resend is accepted once."""
    device = _device()
    pid = geo.a.redis_server.pid
    geo.a.redis_server.kill()
    wait_until_blocking(lambda: not geo.a.redis_server.running, 10, "A's redis dead")
    assert pid is not None
    assert not port_is_open(geo.a.redis_server.port)

    for n in range(3):  # two failures open the breaker; the third finds it open
        geo.b.send(device, geo_order(device, f"in-doubt-{n:04d}", "a"))
        receipt = geo.b.receipt(f"in-doubt-{n:04d}")
        assert (receipt.result, receipt.reason) == ("pending", Reason.AUTHORITY_UNREACHABLE)
    status, body = geo.b.readyz()
    assert status == 200, body  # B's own Redis is fine
    assert body["regions"]["a"]["breaker"] in ("open", "half_open")
    wait_until_blocking(
        lambda: geo.b.readyz()[1]["regions"]["a"]["reachable"] is False, 5, "probe: A down"
    )
    metrics = geo.b.bridge.metrics()
    assert 'bridge_region_failures_total{cause="breaker_open",region="a"} 1.0' in metrics
    assert 'bridge_region_orders_total{region="a",result="pending"} 3.0' in metrics
    # The pending messages were acked (PUBACK after the receipt): nothing is held.
    wait_until_blocking(lambda: "bridge_in_flight 0.0" in geo.b.bridge.metrics(), 5, "in-flight 0")
    geo.b.send(device, geo_order(device, "local-b-0001", "b"))
    assert geo.b.receipt("local-b-0001").result == "accepted"
    assert [e[b"order_id"] for e in geo.b.entries(device)] == [b"local-b-0001"]

    geo.a.redis_server.start()
    wait_until_blocking(lambda: geo.b.breaker("a") == "closed", 15, "breaker closed again")
    assert geo.a.entries(device) == []  # nothing was written while it was down
    geo.b.send(device, geo_order(device, "in-doubt-0000", "a", "b"))
    assert geo.b.receipt("in-doubt-0000", count=2).result == "accepted"
    assert [e[b"order_id"] for e in geo.a.entries(device)] == [b"in-doubt-0000"]


def test_a_blackholed_authority_answers_pending_within_the_timeout_without_stalling_local_orders(
    geo: Rig,
) -> None:
    """A partition (bytes dropped, no reset) between B and A's Redis: `pending` arrives within
    about the region timeout, a local order sent right after it is accepted first, and after
    healing the resend lands once."""
    device = _device()
    geo.proxy.set_blackhole(True)
    started = time.monotonic()
    geo.b.publisher.publish(f"v1/devices/{device}/orders", geo_order(device, "far-0001", "a"))
    geo.b.publisher.publish(f"v1/devices/{device}/orders", geo_order(device, "near-0001", "b"))
    near = geo.b.receipt("near-0001")
    far = geo.b.receipt("far-0001")
    far_s = time.monotonic() - started
    assert near.result == "accepted"
    assert (far.result, far.reason) == ("pending", Reason.AUTHORITY_UNREACHABLE)
    assert geo.proxy.stats.blackholed_bytes > 0  # the write really went into the hole
    # The local order did not wait for the remote timeout: its receipt arrived first. (The
    # times of the two waits, one after the other, were ordered whatever the arrival order.)
    arrived = [r.order_id for d, r in geo.b.receipts.snapshot() if d == device]
    assert arrived.index("near-0001") < arrived.index("far-0001"), arrived
    assert far_s < REGION_TIMEOUT_S + 3.0  # generous slack for a loaded machine
    geo.proxy.set_blackhole(False)
    assert geo.a.entries(device) == []
    wait_until_blocking(lambda: geo.b.breaker("a") == "closed", 15, "breaker closed")
    geo.b.send(device, geo_order(device, "far-0001", "a", "b"))
    assert geo.b.receipt("far-0001", count=2).result in ("accepted", "duplicate")
    assert len(geo.a.entries(device)) == 1


def test_a_bridge_refuses_a_dedup_ttl_shorter_than_the_agents_retry_horizon(tmp_path: Path) -> None:
    """GEO.md scenario 7: the marker TTL must outlive the agents' resend horizon."""
    done = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "--dedup-ttl-s", "3600",
         "--agent-retry-horizon-s", "86400"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "dedup_ttl_s (3600) must be longer than agent_retry_horizon_s" in done.stderr


def test_stream_payload_decodes_with_its_attempts(geo: Rig) -> None:
    """The stored payload is the order as received: the pipeline sees attempts[0]."""
    device = _device()
    geo.a.send(device, geo_order(device, "home-a-0001", "a"))
    assert geo.a.receipt("home-a-0001").result == "accepted"
    (entry,) = geo.a.entries(device)
    order = msgspec.msgpack.decode(entry[b"payload"], type=Order)
    assert order.attempts == ("a",)


def test_a_single_region_bridge_takes_region_aware_orders_and_their_resends(
    bridge_factory: Callable[..., BridgeProcess],
    mqtt_url: str,
    redis_url: str,
    publisher: Publisher,
    receipts: ReceiptCollector,
) -> None:
    """No --region: attempts are ignored for routing (today's behaviour), the order lands here,
    and the resend with a longer attempts list is a duplicate, not a conflict."""
    bridge_factory(mqtt_url, redis_url).start()
    device = _device()
    publisher.publish(f"v1/devices/{device}/orders", geo_order(device, "aware-0001", "eu"))
    publisher.publish(f"v1/devices/{device}/orders", geo_order(device, "aware-0001", "eu", "us"))
    publisher.wait_all(10)

    def answers() -> list[str]:
        return [r.result for d, r in receipts.snapshot() if d == device]

    wait_until_blocking(lambda: len(answers()) == 2, 15, "two receipts")
    assert sorted(answers()) == ["accepted", "duplicate"]
    with redis.Redis.from_url(redis_url) as client:
        entries = [e for e in stream_entries(client) if e[b"device_id"] == device.encode()]
    assert [e[b"order_id"] for e in entries] == [b"aware-0001"]
