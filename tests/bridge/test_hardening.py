"""Bridge hardening: a topic's device id is validated before any per-device state, and the
ops port listens on loopback unless told otherwise."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import redis

from bridge.config import BridgeConfig
from bridge.ingest import DeadLetter, ValidOrder
from bridge.metrics import BridgeMetrics
from bridge.service import Bridge
from bridge.store import AppendResult, RedisState
from schemas import encode
from schemas.names import DLQ_STREAM
from tests.bridge.conftest import BridgeProcess, Publisher
from tests.helpers import make_order, raw_http, wait_until_blocking


class NullSink:
    """An OrderSink that stores nothing (the limiter is what is under test)."""

    async def write(
        self, orders: Sequence[ValidOrder], dead: Sequence[DeadLetter], *, trim_shards: set[int]
    ) -> list[AppendResult]:
        return []

    async def ping(self) -> float:
        return 0.0

    async def confirm_replicas(self) -> None:
        return None

    async def inspect(self) -> RedisState:
        return RedisState(
            aof_enabled=True, appendfsync="always", durable=True, used_memory=0, maxmemory=0
        )


def test_invalid_topic_ids_leave_no_per_device_state() -> None:
    """Ids breaking the contract's rule (4 KB, a trailing newline, a bad character) create
    no limiter bucket; a valid id does."""
    bridge = Bridge(BridgeConfig(rate_per_s=1.0, rate_burst=1), NullSink(), BridgeMetrics())
    acks: list[int] = []
    bad = ["x" * 4096, "kiosk\n", "kiosk a", "kiosk\x00", "a" * 65]

    async def feed() -> None:  # the batcher needs a running loop
        for index, device_id in enumerate([*bad, "kiosk-1"]):
            bridge.take(
                f"v1/devices/{device_id}/orders", b"\x80", functools.partial(acks.append, index)
            )

    asyncio.run(feed())
    assert len(bridge._limits) == 1
    assert "kiosk-1" in bridge._limits


def rss_kib(pid: int) -> int:
    """Resident set size of a process, in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


def test_bridge_memory_stays_flat_under_distinct_4kb_topic_ids(
    *,
    mqtt_url: str,
    redis_url: str,
    bridge_factory: Callable[..., BridgeProcess],
    publisher: Publisher,
    device_id: str,
) -> None:
    """20k orders on 20k distinct 4 KB topic ids: all dead-lettered, RSS grows < 30 MB
    (the limiter once kept every id: +218 MB for 40k)."""
    bridge = bridge_factory(mqtt_url, redis_url, "--share-group", f"g-{device_id}")
    # Every letter stored (no DLQ budget): the bridge's memory is what is measured here.
    bridge.with_args(
        "--rate-per-s", "100", "--rate-burst", "100", "--dlq-device-burst", "100000",
        "--dlq-max-bytes", str(1 << 30),
    ).start()  # fmt: skip
    warmup, count = 2_000, 20_000
    payload = encode(make_order(device_id, 1))

    def flood(start: int, stop: int) -> None:
        for index in range(start, stop):
            publisher.publish(f"v1/devices/{index:04096d}/orders", payload)
        publisher.wait_all()

    with redis.Redis.from_url(redis_url) as client:
        flood(0, warmup)
        wait_until_blocking(lambda: client.xlen(DLQ_STREAM) == warmup, 60, "warm-up dead letters")
        assert bridge.process is not None
        before = rss_kib(bridge.process.pid)
        flood(warmup, count)
        wait_until_blocking(lambda: client.xlen(DLQ_STREAM) == count, 120, "every dead letter")
    grown_mib = (rss_kib(bridge.process.pid) - before) / 1024
    assert grown_mib < 30, f"bridge RSS grew {grown_mib:.0f} MiB"
    assert bridge.terminate() == 0


def listening_hosts(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (from /proc/net/tcp)."""
    hosts = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            hosts.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
    return hosts


def test_ops_port_binds_loopback_by_default(
    mqtt_url: str, redis_url: str, bridge_factory: Callable[..., BridgeProcess]
) -> None:
    """Without --http-host the bridge's /metrics and /readyz listen on 127.0.0.1 only."""
    assert BridgeConfig().http_host == "127.0.0.1"
    bridge = bridge_factory(mqtt_url, redis_url)
    at = bridge.argv.index("--http-host")
    del bridge.argv[at : at + 2]
    bridge.start()
    assert listening_hosts(bridge.http_port) == {"127.0.0.1"}


def test_ops_port_answers_problem_documents_and_echoes_nothing(
    mqtt_url: str, redis_url: str, bridge_factory: Callable[..., BridgeProcess]
) -> None:
    """An unknown path and a header over aiohttp's limit get RFC 9457 problem documents from
    the bridge's ops port, and the oversized header's bytes appear in neither the body nor
    the bridge's log."""
    secret = "ops-secret-" + "x" * 9000
    bridge = bridge_factory(mqtt_url, redis_url)
    bridge.start()
    requests = [
        b"GET /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Token: " + secret.encode() + b"\r\n\r\n",
    ]
    answers = [raw_http(bridge.http_port, request) for request in requests]
    assert [(status, kind.split(";")[0]) for status, kind, _ in answers] == [
        (404, "application/problem+json"),
        (400, "application/problem+json"),
    ]
    assert all(body["status"] == status for status, _, body in answers)
    assert "ops-secret" not in repr(answers)
    bridge.stop()
    assert "ops-secret" not in bridge.log_path.read_text()
