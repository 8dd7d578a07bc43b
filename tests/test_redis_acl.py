"""Least-privilege Redis users (redis-acl/users.acl) and rediss:// for the bridge."""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from bridge.ingest import ValidOrder, classify
from bridge.store import AppendResult, RedisSink
from fleet.pki import CertFiles, create_ca, issue_cert
from fleet.servers import RedisProcess
from schemas import Item, Order, encode
from schemas.names import orders_topic, stream_key

REPO = Path(__file__).resolve().parents[1]
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
    """The bridge appends and dedups as `bridge`; other keys and admin commands are denied."""
    valid = order("kiosk-acl")
    async with RedisSink(url(acl_redis, "bridge"), dedup_ttl_s=60, dlq_maxlen=100) as sink:
        assert await sink.write([valid], [], trim_shards={valid.shard}) == [AppendResult.APPENDED]
        assert await sink.write([valid], [], trim_shards=set()) == [AppendResult.DUPLICATE]
    with redis.Redis.from_url(url(acl_redis, "bridge")) as bridge:
        for denied in (
            lambda: bridge.get("order:kiosk-acl:01ACLTEST0001"),
            bridge.flushall,
            lambda: bridge.config_get("*"),
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
        assert pipeline.eval("return redis.call('HGET', KEYS[1], 'status')", 1, "order:dev:x")
        for denied in (pipeline.flushall, lambda: pipeline.config_get("*"), pipeline.keys):
            with pytest.raises(redis.exceptions.NoPermissionError):
                denied()
        with pytest.raises(redis.exceptions.NoPermissionError):
            pipeline.set("unrelated:key", "1")


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
