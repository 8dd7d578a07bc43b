"""The ops summary (GET /v1/ops/summary) and the ops page's files, over a real Redis."""

from __future__ import annotations

import contextlib
import tomllib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoPermissionError

from bridge.heartbeat import RedisHeartbeat
from pipeline.api import create_app
from pipeline.api_tokens import TokenStore, digest_line, new_token, parse_entries
from pipeline.names import HEALTH_DEVICES_KEY, HEALTH_OLDEST_KEY, health_device_key
from pipeline.ops import PAGE_FILES, FleetView, RedisLike, summary
from schemas.names import BRIDGES_KEY, DLQ_STREAM, PIPELINE_GROUP, bridge_key, stream_key
from servicekit.clock import now_ms
from testrig.servers import RedisProcess
from tests.bridge.conftest import redis_cluster  # noqa: F401 - the fixture

from .conftest import TEST_SHARDS

READ_TOKEN = new_token()
OPERATE_TOKEN = new_token()
ROOT = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def ops_api(
    client: aioredis.Redis, *, secured: bool = True, stale_s: float = 90.0
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """The orders API with a read and an operate token (or none)."""
    lines = [digest_line(READ_TOKEN, "read"), digest_line(OPERATE_TOKEN, "operate")]
    tokens = TokenStore(parse_entries("\n".join(lines), source="test")) if secured else None
    app = create_app(client, shards=TEST_SHARDS, tokens=tokens, health_stale_s=stale_s)
    async with TestClient(TestServer(app)) as http:
        yield http


def bearer(token: str) -> dict[str, str]:
    """An Authorization header."""
    return {"Authorization": f"Bearer {token}"}


async def seed_device(
    client: RedisLike,
    device_id: str,
    *,
    online: bool,
    seen_ago_ms: int,
    oldest_ms: int = 0,
    depth: int = 0,
    version: str | None = "0.1.0",
) -> None:
    """A device's health as the health consumer writes it (layout fixed in pipeline.ops)."""
    seen_at = now_ms() - seen_ago_ms
    await client.zadd(HEALTH_DEVICES_KEY, {device_id: seen_at})
    await client.zadd(HEALTH_OLDEST_KEY, {device_id: oldest_ms})
    await client.hset(
        health_device_key(device_id),
        mapping={
            "online": "1" if online else "0",
            "at": seen_at,
            "seen_at": seen_at,
            "outbox_depth": depth,
            "outbox_bytes": depth * 200,
            "oldest_unreceipted_age_ms": oldest_ms,
            "held": 0,
            "last_broker_error": "" if online else "connection lost",
            "agent_version": version or "",
        },
    )
    if version is None:  # an agent older than the field
        await client.hdel(health_device_key(device_id), "agent_version")


async def test_page_files_are_open_and_locked_down(aredis: aioredis.Redis) -> None:
    """/ops, its script and style need no token, hold no data and carry a strict CSP."""
    async with ops_api(aredis) as http:
        for path, (_name, content_type) in PAGE_FILES.items():
            response = await http.get(path)
            assert response.status == 200, path
            assert response.content_type == content_type
            csp = response.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp
            assert "default-src 'none'" in csp
            assert "unsafe-inline" not in csp
            assert response.headers["X-Content-Type-Options"] == "nosniff"
        page = await (await http.get("/ops")).text()
        assert 'src="ops/ops.js"' in page
        assert "<script>" not in page  # no inline script: the CSP would refuse it
        script = await (await http.get("/ops/ops.js")).text()
        assert "Authorization" in script
        assert "sessionStorage" in script
        assert "innerHTML" not in script  # device strings are rendered as text only


async def test_summary_needs_a_read_token_and_reports_the_role(aredis: aioredis.Redis) -> None:
    """No token: 401; read and operate tokens get the summary with their role; open: 'open'."""
    async with ops_api(aredis) as http:
        assert (await http.get("/v1/ops/summary")).status == 401
        bad = await http.get("/v1/ops/summary", headers=bearer(new_token()))
        assert bad.status == 401
        for token, role in ((READ_TOKEN, "read"), (OPERATE_TOKEN, "operate")):
            response = await http.get("/v1/ops/summary", headers=bearer(token))
            assert response.status == 200
            assert (await response.json())["role"] == role
            assert response.headers["Cache-Control"] == "no-store"
    async with ops_api(aredis, secured=False) as http:
        assert (await (await http.get("/v1/ops/summary")).json())["role"] == "open"


async def test_shards_show_length_lag_and_pending(aredis: aioredis.Redis) -> None:
    """XINFO of each shard: 5 added to shard 1, 3 read by the group, 2 of them acked."""
    stream = stream_key(1)
    ids = [await aredis.xadd(stream, {"n": i}) for i in range(5)]
    await aredis.xgroup_create(stream, PIPELINE_GROUP, id="0")
    await aredis.xreadgroup(PIPELINE_GROUP, "c1", {stream: ">"}, count=3)
    await aredis.xack(stream, PIPELINE_GROUP, ids[0], ids[1])
    await aredis.xadd(stream_key(2), {"n": 0})  # a stream the pipeline has no group on yet
    async with ops_api(aredis, secured=False) as http:
        body = await (await http.get("/v1/ops/summary")).json()
    shards = {s["shard"]: s for s in body["shards"]}
    assert len(shards) == TEST_SHARDS
    assert shards[1] == {
        "shard": 1, "stream": stream, "length": 5, "entries_added": 5, "group": True,
        "lag": 2, "pending": 1, "entries_read": 3, "consumers": 1,
    }  # fmt: skip
    assert shards[2]["group"] is False
    assert shards[2]["lag"] == 1  # nothing read yet: the whole stream waits
    assert shards[0]["length"] == 0
    assert body["totals"] == {
        "length": 6, "entries_added": 6, "lag": 3, "pending": 1, "entries_read": 3,
    }  # fmt: skip


async def test_fleet_counts_and_worst_outboxes(aredis: aioredis.Redis) -> None:
    """Online, offline (Will), stale (silent past the threshold) and the oldest outboxes first."""
    await seed_device(aredis, "dev-online", online=True, seen_ago_ms=1000, oldest_ms=2000, depth=3)
    await seed_device(aredis, "dev-offline", online=False, seen_ago_ms=5_000, oldest_ms=600_000)
    await seed_device(aredis, "dev-silent", online=True, seen_ago_ms=120_000, oldest_ms=90_000)
    await seed_device(aredis, "dev-empty", online=True, seen_ago_ms=500, version="0.2.0")
    await seed_device(aredis, "dev-older", online=True, seen_ago_ms=500, version=None)
    await aredis.zadd(HEALTH_DEVICES_KEY, {"dev-expired": now_ms()})  # its hash expired
    async with ops_api(aredis, secured=False, stale_s=60) as http:
        fleet = (await (await http.get("/v1/ops/summary")).json())["fleet"]
    assert (fleet["devices"], fleet["online"], fleet["offline"], fleet["stale"]) == (6, 3, 1, 2)
    assert fleet["stale_after_s"] == 60
    assert [d["device_id"] for d in fleet["worst"]] == ["dev-offline", "dev-silent", "dev-online"]
    offline, silent, online = fleet["worst"]
    assert offline["online"] is False
    assert offline["last_broker_error"] == "connection lost"
    assert silent["stale"] is True
    assert silent["online"] is True
    assert online["outbox_depth"] == 3
    assert online["oldest_unreceipted_age_ms"] == 2_000
    assert online["agent_version"] == "0.1.0"
    # Per agent version, most devices first; null: never reported (or the hash expired).
    assert fleet["versions"] == [
        {"version": "0.1.0", "devices": 3, "online": 1},
        {"version": None, "devices": 2, "online": 1},
        {"version": "0.2.0", "devices": 1, "online": 1},
    ]


async def test_bridges_ready_stale_gone_and_durability(aredis: aioredis.Redis) -> None:
    """A live ready replica, a not-ready one, one that missed three beats and one expired."""
    now = now_ms()

    async def beat(
        client_id: str, at: int, *, ready: bool, durable: bool, failing: str, version: str = "0.2.0"
    ) -> None:
        await aredis.hset(bridge_key(client_id), mapping={
            "ready": int(ready), "redis_durable": int(durable), "at": at,
            "interval_ms": 5000, "in_flight": 7, "failing": failing, "version": version,
        })  # fmt: skip
        await aredis.zadd(BRIDGES_KEY, {client_id: at})

    await beat("b-ready", now - 1000, ready=True, durable=True, failing="")
    await beat("b-stale", now - 20_000, ready=True, durable=False, failing="", version="0.1.0")
    await aredis.zadd(BRIDGES_KEY, {"b-gone": now - 60_000})
    await aredis.zadd(BRIDGES_KEY, {"b-ancient": now - 2 * 3600 * 1000})  # not listed
    async with ops_api(aredis, secured=False) as http:
        body = await (await http.get("/v1/ops/summary")).json()
        states = {b["client_id"]: b["state"] for b in body["bridges"]}
        assert states == {"b-ready": "ready", "b-stale": "stale", "b-gone": "gone"}
        # The stale replica's "not durable" is old news; the live one's counts.
        assert body["redis_durable"] is True
        ready = next(b for b in body["bridges"] if b["client_id"] == "b-ready")
        assert ready["in_flight"] == 7
        versions = {b["client_id"]: b["version"] for b in body["bridges"]}
        assert versions == {"b-ready": "0.2.0", "b-stale": "0.1.0", "b-gone": None}
        assert 1000 <= ready["age_ms"] < 60_000

        await beat("b-sick", now_ms(), ready=False, durable=False, failing="redis_durable,mqtt")
        body = await (await http.get("/v1/ops/summary")).json()
        sick = next(b for b in body["bridges"] if b["client_id"] == "b-sick")
        assert sick["state"] == "not_ready"
        assert sick["failing"] == ["redis_durable", "mqtt"]
        assert body["redis_durable"] is False

        await aredis.delete(BRIDGES_KEY)
        assert (await (await http.get("/v1/ops/summary")).json())["redis_durable"] is None


async def test_dlq_sizes(aredis: aioredis.Redis) -> None:
    """Both dead-letter streams are counted."""
    await aredis.xadd("pipeline:dlq", {"reason": "max_deliveries"})
    for _ in range(3):
        await aredis.xadd(DLQ_STREAM, {"reason": "invalid_schema"})
    async with ops_api(aredis, secured=False) as http:
        body = await (await http.get("/v1/ops/summary")).json()
    assert body["dlq"] == {"pipeline": 1, "intake": 3}


def test_page_files_ship_in_the_wheel() -> None:
    """Every file under pipeline/static matches the package-data globs in pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = project["tool"]["setuptools"]["package-data"]["pipeline"]
    static = ROOT / "pipeline" / "static"
    files = sorted(p.relative_to(ROOT / "pipeline") for p in static.iterdir())
    assert {name for name, _type in PAGE_FILES.values()} <= {p.name for p in files}
    for path in files:
        assert any(path.match(pattern) for pattern in globs), f"{path} is not packaged"


async def test_heartbeat_and_summary_on_a_redis_cluster(
    redis_cluster: list[int],  # noqa: F811 - the fixture imported above
) -> None:
    """One key per command: beats land and the summary reads every shard across 3 masters."""
    url = f"redis://127.0.0.1:{redis_cluster[0]}/0"
    cluster = RedisCluster.from_url(url)
    try:
        for shard in range(TEST_SHARDS):
            for n in range(shard + 1):
                await cluster.xadd(stream_key(shard), {"n": n})
        await cluster.xgroup_create(stream_key(3), PIPELINE_GROUP, id="0")
        await cluster.xreadgroup(PIPELINE_GROUP, "c", {stream_key(3): ">"}, count=1)
        await seed_device(cluster, "dev-c", online=False, seen_ago_ms=10, oldest_ms=5)
        async with RedisHeartbeat(url, cluster=True) as store:
            await store.beat("b-c", {"ready": 1, "redis_durable": 1, "at": now_ms()}, 30)
        result = await summary(cluster, shards=TEST_SHARDS, fleet=FleetView(), role="open")
    finally:
        await cluster.aclose()
    assert [s.length for s in result.shards] == [1, 2, 3, 4]
    assert (result.shards[3].pending, result.shards[3].lag) == (1, 3)
    assert [b.state for b in result.bridges] == ["ready"]
    assert result.redis_durable is True
    assert (result.fleet.offline, [d.device_id for d in result.fleet.worst]) == (1, ["dev-c"])


async def test_acl_users_may_beat_and_read_the_summary(
    tmp_path: Path, redis_factory: Callable[..., RedisProcess]
) -> None:
    """users.acl: the bridge beats, the pipeline reads it all, nothing is denied."""
    acl = (ROOT / "redis-acl/users.acl").read_text().replace(">change-me-", ">test-")
    (tmp_path / "users.acl").write_text(acl)
    server = redis_factory(extra_args=("--aclfile", str(tmp_path / "users.acl")))

    def url(user: str) -> str:
        return f"redis://{user}:test-{user}@127.0.0.1:{server.port}/0"

    admin = aioredis.Redis.from_url(url("admin"))
    pipeline = aioredis.Redis.from_url(url("pipeline"))
    try:
        await seed_device(admin, "dev-acl", online=True, seen_ago_ms=10, oldest_ms=50)
        await admin.xadd(stream_key(0), {"n": 1})
        await admin.xgroup_create(stream_key(0), PIPELINE_GROUP, id="0")
        async with RedisHeartbeat(url("bridge")) as store:
            await store.beat("b-acl", {"ready": 1, "redis_durable": 1, "at": now_ms()}, 30)
        result = await summary(pipeline, shards=TEST_SHARDS, fleet=FleetView(), role="read")
        assert result.shards[0].length == 1
        assert [b.client_id for b in result.bridges] == ["b-acl"]
        assert result.fleet.online == 1
        assert await admin.acl_log() == []
        with pytest.raises(NoPermissionError):  # the bridges' heartbeats are read-only here
            await pipeline.hset(bridge_key("b-acl"), "ready", "0")
    finally:
        await admin.aclose()
        await pipeline.aclose()
