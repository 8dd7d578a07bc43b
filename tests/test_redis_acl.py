"""Least-privilege Redis users (redis-acl/users.acl) and rediss:// for the bridge.

Every service runs end to end as its own user against a real redis-server
loaded with the committed ACL file: the bridge's ingest, the pipeline's catalog
load, workers, orders API and DLQ replay. Afterwards Redis's ACL LOG must be
empty: no command any service sent was denied. What each user may not do is tried
as that user too, directly and from a loaded script: forging a dedup marker as
`pipeline`, replacing any stream (SET, DEL, RENAME, …) as `bridge` or
`pipeline`, writing keys outside each service's job.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from bridge.ingest import ValidOrder, classify
from bridge.store import AppendResult, RedisSink
from enrolment.pki import CertFiles, create_ca, issue_cert
from pipeline.config import PipelineConfig
from pipeline.health import HealthConsumer, HealthMetrics
from pipeline.names import CATALOG_KEY, PIPELINE_DLQ_STREAM, events_key, health_device_key
from schemas import Health, Item, Order, encode
from schemas.names import (
    DLQ_STREAM,
    PIPELINE_GROUP,
    health_topic,
    orders_topic,
    seen_key,
    shard_of,
    stream_key,
)
from servicekit import layout
from servicekit.clock import now_ms
from testrig.servers import RedisProcess, free_port
from tests.bridge.conftest import BridgeProcess, Publisher, ReceiptCollector
from tests.pipeline.processes import env_for, spawn, stop_all

REPO = Path(__file__).resolve().parents[1]
DEMO_CATALOG = REPO / "pipeline" / "demo_catalog.toml"
SHARDS = 4


@pytest.fixture
def acl_redis(tmp_path: Path, redis_factory: Callable[..., RedisProcess]) -> RedisProcess:
    """A Redis running the committed ACL file, its placeholder passwords replaced."""
    acl = (REPO / "redis-acl/users.acl").read_text().replace(">change-me-", ">test-")
    path = tmp_path / "users.acl"
    path.write_text(acl)
    return redis_factory(extra_args=("--aclfile", str(path)))


def url(server: RedisProcess, user: str) -> str:
    """A URL authenticating as ``user`` (test password ``test-{user}``)."""
    return f"redis://{user}:test-{user}@127.0.0.1:{server.port}/0"


def denials(server: RedisProcess) -> list[str]:
    """What Redis's ACL LOG recorded: ``user: command (reason)`` per denial."""
    with redis.Redis.from_url(url(server, "admin")) as admin:
        return [
            f"{e['username']}: {e['object']} ({e['reason']}, {e['context']})"
            for e in admin.acl_log()
        ]


def order(device_id: str) -> ValidOrder:
    """A classified valid order, as the bridge's ingest produces it."""
    payload = encode(
        Order(
            v=1, order_id="01ACLTEST0001", device_id=device_id, seq=1, created_at=1,
            currency="EUR", items=(Item("A", 1, 5),), total=5,
        )
    )  # fmt: skip
    item = classify(orders_topic(device_id), payload, shards=SHARDS, received_at_ms=1)
    assert isinstance(item, ValidOrder)
    return item


async def test_bridge_user_runs_the_ingest_script_and_nothing_else(acl_redis: RedisProcess) -> None:
    """The bridge appends and dedups as `bridge`; other keys, consuming and changing the
    server are denied (it may read settings: its durability check)."""
    valid = order("kiosk-acl")
    async with RedisSink(url(acl_redis, "bridge"), dedup_ttl_s=60, dlq_maxlen=100) as sink:
        assert await sink.write([valid], [], trim_shards={valid.shard}) == [AppendResult.APPENDED]
        assert await sink.write([valid], [], trim_shards=set()) == [AppendResult.DUPLICATE]
    with redis.Redis.from_url(url(acl_redis, "bridge")) as bridge:
        for denied in (
            lambda: bridge.get("order:kiosk-acl:01ACLTEST0001"),
            bridge.flushall,
            lambda: bridge.config_set("appendonly", "no"),
            lambda: bridge.xreadgroup("g", "c", {stream_key(valid.shard): ">"}),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                denied()
    with redis.Redis.from_url(url(acl_redis, "admin")) as admin:
        assert admin.xlen(stream_key(valid.shard)) == 1


def test_pipeline_user_reads_streams_but_cannot_administer(acl_redis: RedisProcess) -> None:
    """`pipeline` consumes shard streams and writes its records; FLUSHALL/CONFIG are denied."""
    with redis.Redis.from_url(url(acl_redis, "admin")) as admin:
        admin.xadd(stream_key(0), {"order_id": "x"})
    with redis.Redis.from_url(url(acl_redis, "pipeline")) as pipeline:
        pipeline.xgroup_create(stream_key(0), "pipeline", id="0")
        [[_, entries]] = pipeline.xreadgroup("pipeline", "w1", {stream_key(0): ">"})
        assert pipeline.xack(stream_key(0), "pipeline", entries[0][0]) == 1
        pipeline.hset("order:dev:x", "status", "fulfilled")
        sha = pipeline.script_load("return redis.call('HGET', KEYS[1], 'status')")
        assert pipeline.evalsha(sha, 1, "order:dev:x") == b"fulfilled"
        for denied in (
            pipeline.flushall,
            lambda: pipeline.config_get("*"),
            pipeline.keys,
            lambda: pipeline.eval("return 1", 0),  # scripts are loaded, then run by SHA
            lambda: pipeline.delete("order:dev:x"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                denied()
        with pytest.raises(redis.exceptions.NoPermissionError):
            pipeline.set("unrelated:key", "1")


async def test_pipeline_user_keeps_the_fleet_health_view(acl_redis: RedisProcess) -> None:
    """The health consumer's writes and sweep pass the ACL; `health:*` is all it gets beyond."""
    client = aioredis.Redis.from_url(url(acl_redis, "pipeline"))
    try:
        consumer = HealthConsumer(client, HealthMetrics(CollectorRegistry()), ttl_s=60)
        topic = health_topic("kiosk-1")
        report = Health(v=1, online=True, at=now_ms(), outbox_depth=1, agent_version="1")
        assert await consumer.write([(topic, encode(report))]) == 1
        assert await consumer.write([(topic, encode(Health(v=1, online=False, at=2)))]) == 1
        assert await consumer.sweep() == (0, 0, 1)
    finally:
        await client.aclose()
    assert denials(acl_redis) == []
    with redis.Redis.from_url(url(acl_redis, "admin")) as admin:
        assert admin.hget(health_device_key("kiosk-1"), "online") == b"0"


FORGE_SCRIPT = "return redis.call('SET', ARGV[1], 'forged')"


def refused_in_script(client: redis.Redis, key: str) -> None:
    """A loaded script SETting ``key`` as ``client``'s user fails, the key undeclared:
    Redis checks each command a script calls against the calling user."""
    sha = client.script_load(FORGE_SCRIPT)
    with pytest.raises(redis.exceptions.ResponseError, match="can't access at least one"):
        client.evalsha(sha, 0, key)


async def test_pipeline_user_cannot_forge_a_dedup_marker(acl_redis: RedisProcess) -> None:
    """A marker forged with the `pipeline` credentials once made a device's real order
    `conflict`; now SET (direct or in a script) is refused and the order is appended."""
    valid = order("kiosk-forge")
    marker = seen_key(valid.shard, valid.device_id, valid.order_id)
    with redis.Redis.from_url(url(acl_redis, "pipeline")) as pipeline:
        with pytest.raises(redis.exceptions.NoPermissionError):
            pipeline.set(marker, "forged-digest")
        refused_in_script(pipeline, marker)
        with pytest.raises(redis.exceptions.NoPermissionError):
            pipeline.get(marker)  # nothing the pipeline does needs the markers
    assert set(denials(acl_redis)) == {
        f"pipeline: {marker} (key, toplevel)",
        f"pipeline: {marker} (key, lua)",
    }
    async with RedisSink(url(acl_redis, "bridge"), dedup_ttl_s=60, dlq_maxlen=100) as sink:
        assert await sink.write([valid], [], trim_shards=set()) == [AppendResult.APPENDED]


STREAMS = (stream_key(0), events_key(0), DLQ_STREAM, PIPELINE_DLQ_STREAM)


def overwrites(client: redis.Redis, key: str) -> list[Callable[[], object]]:
    """Every way to replace or drop ``key`` as a whole."""
    return [
        lambda: client.set(key, "x"),
        lambda: client.set(key, "x", get=True),
        lambda: client.execute_command("SETEX", key, 60, "x"),  # type: ignore[no-untyped-call]
        lambda: client.execute_command("GETSET", key, "x"),  # type: ignore[no-untyped-call]
        lambda: client.mset({key: "x"}),
        lambda: client.delete(key),
        lambda: client.unlink(key),
        lambda: client.rename(key, f"{key}:moved"),
        lambda: client.copy("pipeline:catalog", key, replace=True),
        lambda: client.restore(key, 0, b"", replace=True),
        lambda: client.expire(key, 1),
        lambda: client.pexpire(key, 1),
    ]


@pytest.mark.parametrize("user", ["bridge", "pipeline"])
def test_no_service_user_may_replace_a_stream(acl_redis: RedisProcess, user: str) -> None:
    """SET over `orders:{0}` as the bridge once wiped the shard's stream: now no service
    user may SET, DEL, RENAME, COPY over, RESTORE or expire any stream, directly or from
    a script, and every stream keeps its entry."""
    with redis.Redis.from_url(url(acl_redis, "admin")) as admin:
        for stream in STREAMS:
            admin.xadd(stream, {"order_id": "kept"})
    with redis.Redis.from_url(url(acl_redis, user)) as client:
        for stream in STREAMS:
            for attempt in overwrites(client, stream):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    attempt()
            refused_in_script(client, stream)
    with redis.Redis.from_url(url(acl_redis, "admin")) as admin:
        assert [admin.type(s) for s in STREAMS] == [b"stream"] * len(STREAMS)
        assert [admin.xlen(s) for s in STREAMS] == [1] * len(STREAMS)


def test_bridge_user_writes_only_its_scripts_keys(acl_redis: RedisProcess) -> None:
    """Beyond its script's stream and markers, the DLQ, its heartbeat, the WAIT fence and
    the manifest, the bridge writes nothing: not the pipeline's events stream or DLQ, not
    a layout change's saved stock, not a stream's consumer groups."""
    with redis.Redis.from_url(url(acl_redis, "admin")) as admin:
        admin.xadd(stream_key(0), {"order_id": "kept"})
        admin.xgroup_create(stream_key(0), PIPELINE_GROUP, id="0")
    with redis.Redis.from_url(url(acl_redis, "bridge")) as bridge:
        attempts: list[Callable[[], object]] = [
            lambda: bridge.xadd(events_key(0), {"forged": "1"}),
            lambda: bridge.xadd(PIPELINE_DLQ_STREAM, {"forged": "1"}),
            lambda: bridge.set("deployment:layout-change", "{}"),
            lambda: bridge.set("orders:wait-fence", "x"),
            lambda: bridge.xgroup_destroy(stream_key(0), PIPELINE_GROUP),
            lambda: bridge.xgroup_setid(stream_key(0), PIPELINE_GROUP, "$"),
            lambda: bridge.xdel(stream_key(0), "0-1"),
            lambda: bridge.hset("ops:bridges", "x", "1"),
        ]
        for denied in attempts:
            with pytest.raises(redis.exceptions.NoPermissionError):
                denied()


def test_pipeline_user_cannot_rewrite_intake_entries(acl_redis: RedisProcess) -> None:
    """The pipeline consumes the shard streams but may not delete their entries, write
    the intake DLQ or delete from it (it lists it; only its own letters are replayable),
    or SET its own hashes (the catalog) away."""
    with redis.Redis.from_url(url(acl_redis, "admin")) as admin:
        entry = admin.xadd(stream_key(0), {"order_id": "kept"})
        dead = admin.xadd(DLQ_STREAM, {"reason": "kept"})
        admin.hset("pipeline:catalog", "COLA-33", "150")
    with redis.Redis.from_url(url(acl_redis, "pipeline")) as pipeline:
        attempts: list[Callable[[], object]] = [
            lambda: pipeline.xdel(stream_key(0), entry),
            lambda: pipeline.xadd(DLQ_STREAM, {"forged": "1"}),
            lambda: pipeline.xdel(DLQ_STREAM, dead),
            lambda: pipeline.set("pipeline:catalog", "x"),
            lambda: pipeline.set("deployment:layout-change", "{}"),
        ]
        for denied in attempts:
            with pytest.raises(redis.exceptions.NoPermissionError):
                denied()
    with redis.Redis.from_url(url(acl_redis, "admin")) as admin:
        assert admin.xlen(stream_key(0)) == admin.xlen(DLQ_STREAM) == 1
        assert admin.hget("pipeline:catalog", "COLA-33") == b"150"


@pytest.mark.parametrize("user", ["bridge", "pipeline"])
async def test_each_service_user_writes_the_manifest(acl_redis: RedisProcess, user: str) -> None:
    """The first service to start records the deployment manifest (compare-and-set
    script) and later ones read it, under either service user."""
    client = layout.connect(url(acl_redis, user))
    try:
        assert await layout.swap(client, None, layout.Manifest(SHARDS, ()))
        raw, current = await layout.read(client)
        assert current == layout.Manifest(SHARDS, ())
        assert await layout.swap(client, raw, layout.Manifest(SHARDS, ("eu",)))
    finally:
        await client.aclose()
    assert denials(acl_redis) == []


def test_unauthenticated_clients_may_only_ping(acl_redis: RedisProcess) -> None:
    """Health probes can PING without a password; nothing else."""
    with redis.Redis(port=acl_redis.port) as anonymous:
        assert anonymous.ping()
        with pytest.raises(redis.exceptions.NoPermissionError):
            anonymous.get("orders:{0}")


class TlsRedis(RedisProcess):
    """redis-server serving TLS only; readiness is a TLS PING."""

    def __init__(self, workdir: Path, certs: CertFiles, server: CertFiles) -> None:
        tls_args = (
            "--port", "0", "--tls-port", "{port}", "--tls-cert-file", str(server.cert),
            "--tls-key-file", str(server.key), "--tls-ca-cert-file", str(certs.cert),
            "--tls-auth-clients", "no",
        )  # fmt: skip
        # The base command's plain --port is overridden to 0 by these later arguments.
        super().__init__(workdir)
        self.extra_args = tuple(arg.replace("{port}", str(self.port)) for arg in tls_args)
        self.ca = certs

    def is_ready(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.ca.cert))
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), 0.5) as sock,
            context.wrap_socket(sock, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"PING\r\n")
            return tls.recv(64).startswith(b"+PONG")
        return False


async def test_bridge_writes_over_rediss(tmp_path: Path) -> None:
    """`rediss://` works end to end: the bridge's sink appends over TLS, verified by the CA."""
    ca = create_ca(tmp_path / "pki")
    server_cert = issue_cert(ca, tmp_path / "pki", "localhost", server=True)
    with TlsRedis(tmp_path / "redis", ca, server_cert) as server:
        tls_url = f"rediss://localhost:{server.port}/0?ssl_ca_certs={ca.cert}"
        valid = order("kiosk-tls")
        async with RedisSink(tls_url, dedup_ttl_s=60, dlq_maxlen=100) as sink:
            assert await sink.write([valid], [], trim_shards=set()) == [AppendResult.APPENDED]
        with redis.Redis.from_url(tls_url) as client:
            assert client.xlen(stream_key(valid.shard)) == 1


def pipeline_env(server: RedisProcess, mqtt_url: str, **settings: object) -> dict[str, str]:
    """``ORDERS_*`` for an `order-pipeline` process logged in as `pipeline`."""
    config = PipelineConfig(
        redis_url=url(server, "pipeline"), mqtt_url=mqtt_url, shards=SHARDS, block_ms=50,
        claim_idle_ms=300, claim_every_ms=100, max_deliveries=2, payment_backoff_ms=1,
    )  # fmt: skip
    return env_for(config, **settings)


def run_until(
    predicate: Callable[[], bool], what: str, server: RedisProcess, timeout_s: float = 30.0
) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` and what Redis denied."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {denials(server)}"
        time.sleep(0.05)


def http_json(method: str, url_: str) -> tuple[int, Any]:
    """One request; the status and the decoded JSON body."""
    request = urllib.request.Request(url_, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
    except urllib.error.URLError:  # not listening yet
        return 0, {}


def order_bytes(device_id: str, order_id: str) -> bytes:
    """A valid order for two COLA-33 of the demo catalog."""
    return encode(
        Order(
            v=1, order_id=order_id, device_id=device_id, seq=1, created_at=1,
            currency="EUR", items=(Item("COLA-33", 2, 150),), total=300,
        )
    )  # fmt: skip


def test_every_service_runs_end_to_end_as_its_own_user(
    acl_redis: RedisProcess, mqtt_url: str, tmp_path: Path
) -> None:
    """Catalog load; bridge ingest (accepted, duplicate, dead letter, trimming); workers
    reading, reclaiming a dead consumer's entry and forgetting an idle consumer; the orders
    API; a poison entry dead-lettered and replayed. Each service as its own user, and Redis
    denied nothing."""
    device = "kiosk-acl-e2e"
    first, second = "01ACLE2E0001", "01ACLE2E0002"
    # 1. `order-pipeline catalog load` as `pipeline` (once exited 1 without MULTI/EXEC).
    loaded = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "catalog", "load", str(DEMO_CATALOG)],
        env=pipeline_env(acl_redis, mqtt_url), capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr.decode()
    admin = redis.Redis.from_url(url(acl_redis, "admin"))
    assert admin.hget(CATALOG_KEY, "COLA-33") == b"150"
    # 2. The bridge as `bridge`, trimming after every batch so XTRIM/XINFO/XPENDING run too.
    bridge = BridgeProcess(
        tmp_path, mqtt_url, url(acl_redis, "bridge"),
        "--shards", str(SHARDS), "--trim-every-batches", "1", "--share-group", f"g-{device}",
    )  # fmt: skip
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    log = tmp_path / "pipeline.log"
    collector = ReceiptCollector(mqtt_url)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        bridge.start()
        assert bridge.status("/readyz") == 200
        publisher = Publisher(mqtt_url)
        try:
            for body in (
                order_bytes(device, first), order_bytes(device, first), b"\xc1 not msgpack",
                order_bytes(device, second),
            ):  # fmt: skip
                publisher.publish(orders_topic(device), body)
            publisher.wait_all()
        finally:
            publisher.close()

        def results() -> list[str]:
            return sorted(f"{r.result}" for d, r in collector.snapshot() if d == device)

        run_until(lambda: len(results()) == 4, "four receipts", acl_redis)
        assert results() == ["accepted", "accepted", "duplicate", "rejected"]
        # 3. A consumer that died holding the first order, and one idle holding nothing.
        stream = stream_key(shard_of(device, SHARDS))
        admin.xgroup_create(stream, PIPELINE_GROUP, id="0")
        read: Any = admin.xreadgroup(PIPELINE_GROUP, "ghost-1", {stream: ">"}, count=1)
        [[_, [(_, stolen)]]] = read
        assert stolen[b"order_id"] == first.encode()
        admin.xgroup_createconsumer(stream, PIPELINE_GROUP, "ghost-2")
        time.sleep(0.3)
        # 4. Workers and API as `pipeline`.
        env = pipeline_env(acl_redis, mqtt_url, http_port=port, dead_consumer_idle_ms=200)
        processes.append(spawn(["--workers", "1"], env, log))

        def status_of(order_id: str) -> object:
            return http_json("GET", f"{api}/v1/orders/{order_id}")[1].get("status")

        run_until(
            lambda: status_of(first) == status_of(second) == "fulfilled",
            "both orders fulfilled, the first reclaimed from ghost-1",
            acl_redis,
        )
        assert "forgot_dead_consumer" in log.read_text()
        assert "reclaimed" in log.read_text()
        status, page = http_json("GET", f"{api}/v1/devices/{device}/orders")
        assert status == 200
        assert sorted(item["order_id"] for item in page["items"]) == [first, second]
        # 5. A poison entry (undecodable in the shard stream) is dead-lettered by a worker,
        #    then listed and replayed through the API.
        admin.xadd(stream, {
            "order_id": "01ACLPOISON1", "device_id": device, "seq": "2",
            "received_at": "1", "payload": b"\xc1",
        })  # fmt: skip

        def pipeline_letters() -> list[dict[str, Any]]:
            _, body = http_json("GET", f"{api}/v1/dlq")
            return [e for e in body.get("items", []) if e.get("source") == "pipeline"]

        run_until(lambda: len(pipeline_letters()) == 1, "the poison entry in the DLQ", acl_redis)
        [letter] = pipeline_letters()
        status, _ = http_json("POST", f"{api}/v1/dlq/{letter['id']}/replay")
        assert status == 202, status
        # Replay moves the entry out of pipeline:dlq; the poison comes back under a new id.
        run_until(
            lambda: [e["id"] for e in pipeline_letters()] not in ([], [letter["id"]]),
            "the replayed entry dead-lettered again",
            acl_redis,
        )
        assert bridge.terminate() == 0
        processes[0].send_signal(signal.SIGTERM)
        assert processes[0].wait(30) == 0
    finally:
        collector.close()
        bridge.stop()
        stop_all(processes)
        admin.close()
    assert denials(acl_redis) == []
    assert "NOPERM" not in log.read_text()


def test_services_warn_loudly_without_a_redis_password(
    redis_url: str, mqtt_url: str, tmp_path: Path
) -> None:
    """The bridge and `order-pipeline catalog load` given a password-less URL log a warning
    (and still run: the dev stack has no ACL)."""
    bridge = BridgeProcess(tmp_path, mqtt_url, redis_url)
    try:
        bridge.start()
    finally:
        bridge.stop()
    assert "redis_url_without_password" in bridge.log_path.read_text()
    config = PipelineConfig(redis_url=redis_url, mqtt_url=mqtt_url, shards=4)  # the bridge's
    loaded = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "catalog", "load", str(DEMO_CATALOG)],
        env=env_for(config), capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert loaded.returncode == 0
    warnings = [
        json.loads(line) for line in loaded.stderr.decode().splitlines()
        if "redis_url_without_password" in line
    ]  # fmt: skip
    assert [w["level"] for w in warnings] == ["warning"]
