"""The ops page (``/ops``) and its data (``GET /v1/ops/summary``) on the orders API.

How the page authenticates: the page itself (``/ops``, ``/ops/ops.js``,
``/ops/ops.css``) is static and carries no data, so it is served without a
token; a browser navigation cannot send ``Authorization`` anyway. Every data
call the page's script makes (the summary, the DLQ listing, a replay) sends
``Authorization: Bearer`` with the token the operator typed into the page,
kept in ``sessionStorage`` (this tab only, gone when it closes). So the page
gets exactly the roles of the API: ``read`` sees everything, only ``operate``
can replay. We chose this over a cookie because a cookie rides along on
every request a browser makes, cross-site forms included: it would need a
login endpoint and CSRF protection for replay, where a bearer header set by
our own script cannot be forged by another origin (the API sends no CORS
headers). The static files go out with a strict Content-Security-Policy
(scripts from this origin only, no inline code) and the script renders with
``textContent`` only, so a device-supplied string cannot run as code.

The summary, read fresh from Redis on every call (one key per command, so it
works on a Redis Cluster too):

* shards: per ``orders:{N}``, ``XINFO STREAM`` (length, entries added) and
  ``XINFO GROUPS`` of the pipeline group (lag, pending, entries read);
  throughput is the page's own sampling of the entries-added and
  entries-read totals between two calls;
* fleet: the health consumer's ``health:*`` keys (see below): online,
  offline (its Will came) and stale (silent for ``health_stale_s``), the
  devices per agent version (a mixed fleet mid-upgrade), and the devices
  with the oldest unreceipted orders;
* the DLQ sizes (the page lists entries with ``GET /v1/dlq``);
* the bridge replicas' heartbeats (:mod:`bridge.heartbeat`), with each
  replica's version, and, from them, whether Redis is durable.

Fleet-health layout (written by the health consumer, read here)::

    health:devices           zset   device_id -> last seen (ms)
    health:oldest            zset   device_id -> oldest_unreceipted_age_ms
    health:device:{id}       hash   online "1"/"0", at, seen_at, outbox_depth, outbox_bytes,
                                    oldest_unreceipted_age_ms, held, last_broker_error,
                                    agent_version
"""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import Any, Final, Literal

import msgspec
import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from schemas.names import BRIDGES_KEY, DLQ_STREAM, PIPELINE_GROUP, bridge_key, stream_key
from servicekit.clock import now_ms
from servicekit.redis_clients import text

from .health import MAX_UNRECEIPTED_AGE_MS
from .names import (
    HEALTH_DEVICES_KEY,
    HEALTH_OLDEST_KEY,
    PIPELINE_DLQ_STREAM,
    health_device_key,
)

DEFAULT_HEALTH_STALE_S: Final = 900.0  # 3 × the agents' default health interval
# Devices whose health hash the summary reads per call, most recently seen first;
# the rest of a larger fleet is counted as `unscanned`.
FLEET_SCAN_MAX: Final = 10_000
_SCAN_CHUNK: Final = 1000
WORST_DEVICES: Final = 10
BRIDGES_MAX: Final = 50
BRIDGE_LISTED_FOR_MS: Final = 3600 * 1000  # a replica silent this long drops off the page
BRIDGE_STALE_BEATS: Final = 3  # beats missed before a replica counts as stale
DEFAULT_BEAT_MS: Final = 5000

RedisLike = aioredis.Redis | RedisCluster
ViewerRole = Literal["read", "operate", "open"]
# The caller's role, set by the auth middleware for the summary to report.
ROLE_KEY: Final = web.RequestKey[ViewerRole]("ops_role")
BridgeState = Literal["ready", "not_ready", "stale", "gone"]

# The page's files: path -> (file in pipeline/static, content type).
PAGE_FILES: Final = {
    "/ops": ("ops.html", "text/html"),
    "/ops/ops.js": ("ops.js", "text/javascript"),
    "/ops/ops.css": ("ops.css", "text/css"),
}
PAGE_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class ShardStats(msgspec.Struct):
    """One shard stream and the pipeline group on it.

    ``lag`` is null when Redis cannot tell (entries were deleted mid-stream);
    ``group`` is false until the pipeline created its group there, and the
    lag is then the whole stream.
    """

    shard: int
    stream: str
    length: int
    entries_added: int
    group: bool
    lag: int | None
    pending: int
    entries_read: int | None
    consumers: int


class ShardTotals(msgspec.Struct):
    """Sums over the shards; the page's throughput is their change per second."""

    length: int
    entries_added: int
    lag: int
    pending: int
    entries_read: int


class DeviceHealth(msgspec.Struct):
    """A device with unreceipted orders, from its last health report."""

    device_id: str
    oldest_unreceipted_age_ms: int
    online: bool | None
    stale: bool
    seen_at: int | None
    outbox_depth: int | None
    outbox_bytes: int | None
    held: int | None
    last_broker_error: str | None
    agent_version: str | None


class VersionCount(msgspec.Struct):
    """Scanned devices whose last report named this agent version, and how many are online.

    ``version`` is null for devices that never said (agents older than the
    field, or only a Will heard since the report expired).
    """

    version: str | None
    devices: int
    online: int


class FleetHealth(msgspec.Struct):
    """Devices by state: online, offline (Will received), stale (silent), not scanned.

    ``at``: when these were read (ms); a scan is shared for up to 5 s.
    ``versions``: the scanned devices per agent version, most devices first.
    """

    at: int
    devices: int
    online: int
    offline: int
    stale: int
    unscanned: int
    stale_after_s: float
    worst: list[DeviceHealth]
    versions: list[VersionCount]


class DlqSizes(msgspec.Struct):
    """Entries in the pipeline DLQ (replayable) and the bridge's intake DLQ."""

    pipeline: int
    intake: int


class BridgeReplica(msgspec.Struct):
    """A bridge replica's last heartbeat; ``state`` stale after three missed beats.

    ``version``: its release, null for replicas older than the field (or gone).
    """

    client_id: str
    state: BridgeState
    version: str | None
    ready: bool | None
    redis_durable: bool | None
    in_flight: int | None
    failing: list[str]
    at: int
    age_ms: int


class OpsSummary(msgspec.Struct):
    """Everything the ops page shows, read from Redis at ``at`` (ms).

    ``redis_durable``: every live bridge reports Redis durable (AOF,
    appendfsync always); null when no live bridge reports. ``role``: the
    caller's token role, ``open`` when the API runs without tokens.
    """

    at: int
    role: ViewerRole
    shards: list[ShardStats]
    totals: ShardTotals
    fleet: FleetHealth
    dlq: DlqSizes
    bridges: list[BridgeReplica]
    redis_durable: bool | None


def _int(value: Any) -> int | None:
    if value is None or value == b"":
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _str(value: Any) -> str | None:
    return None if value is None or value == b"" else text(value)


async def shard_stats(client: RedisLike, shards: int) -> list[ShardStats]:
    """XINFO STREAM and XINFO GROUPS of every shard, in one round trip."""
    async with client.pipeline(transaction=False) as pipe:
        for shard in range(shards):
            pipe.xinfo_stream(stream_key(shard))
            pipe.xinfo_groups(stream_key(shard))
        replies = await pipe.execute(raise_on_error=False)
    out = []
    for shard in range(shards):
        info, groups = replies[2 * shard], replies[2 * shard + 1]
        for reply in (info, groups):
            missing = isinstance(reply, ResponseError) and "no such key" in str(reply)
            if isinstance(reply, BaseException) and not missing:
                raise reply
        if isinstance(info, BaseException):  # no stream yet
            out.append(ShardStats(shard, stream_key(shard), 0, 0, False, None, 0, None, 0))
            continue
        if isinstance(groups, BaseException):  # the stream went away between the two reads
            groups = []
        group = next(
            (g for g in groups if text(g.get("name", b"")) == PIPELINE_GROUP),
            None,
        )
        out.append(
            ShardStats(
                shard=shard,
                stream=stream_key(shard),
                length=int(info.get("length", 0)),
                entries_added=int(info.get("entries-added", 0)),
                group=group is not None,
                lag=_int(group.get("lag")) if group else int(info.get("length", 0)),
                pending=int(group.get("pending", 0)) if group else 0,
                entries_read=_int(group.get("entries-read")) if group else None,
                consumers=int(group.get("consumers", 0)) if group else 0,
            )
        )
    return out


def totals(shards: list[ShardStats]) -> ShardTotals:
    """Sums over the shards (an unknown lag or read count counts 0)."""
    return ShardTotals(
        length=sum(s.length for s in shards),
        entries_added=sum(s.entries_added for s in shards),
        lag=sum(s.lag or 0 for s in shards),
        pending=sum(s.pending for s in shards),
        entries_read=sum(s.entries_read or 0 for s in shards),
    )


async def fleet_health(client: RedisLike, stale_s: float, at_ms: int) -> FleetHealth:
    """Counts by state over the most recently seen devices, and the worst outbox ages."""
    stale_before = at_ms - int(stale_s * 1000)
    devices = int(await client.zcard(HEALTH_DEVICES_KEY))
    # BYSCORE REV LIMIT, not an index range: redis-py sends that as ZREVRANGE (another ACL).
    members: Any = await client.zrange(
        HEALTH_DEVICES_KEY, "+inf", "-inf", desc=True, byscore=True,
        offset=0, num=FLEET_SCAN_MAX, withscores=True,
    )  # fmt: skip
    online = offline = stale = 0
    versions: dict[str | None, VersionCount] = {}
    for start in range(0, len(members), _SCAN_CHUNK):
        chunk = members[start : start + _SCAN_CHUNK]
        async with client.pipeline(transaction=False) as pipe:
            for member, _score in chunk:
                pipe.hmget(health_device_key(text(member)), ["online", "seen_at", "agent_version"])
            rows = await pipe.execute()
        for (_member, score), (is_online, seen_at, version) in zip(chunk, rows, strict=True):
            seen = _int(seen_at) or int(score)
            tally = versions.setdefault(_str(version), VersionCount(_str(version), 0, 0))
            tally.devices += 1
            if is_online == b"0":
                offline += 1
            elif is_online is None or seen < stale_before:
                stale += 1  # silent without a Will, or its report expired
            else:
                online += 1
                tally.online += 1
    worst_rows: Any = await client.zrange(
        # Capped: a figure past the sane range (stored before reports were checked) is no age.
        HEALTH_OLDEST_KEY, MAX_UNRECEIPTED_AGE_MS, "(0", desc=True, byscore=True,
        offset=0, num=WORST_DEVICES, withscores=True,
    )  # fmt: skip
    async with client.pipeline(transaction=False) as pipe:
        for member, _age in worst_rows:
            pipe.hgetall(health_device_key(text(member)))
        reports = await pipe.execute()
    worst = []
    for (member, age), report in zip(worst_rows, reports, strict=True):
        fields = {text(k): v for k, v in report.items()}
        seen_at = _int(fields.get("seen_at"))
        online_flag = fields.get("online")
        worst.append(
            DeviceHealth(
                device_id=text(member),
                oldest_unreceipted_age_ms=int(age),
                online=None if online_flag is None else online_flag == b"1",
                stale=seen_at is None or seen_at < stale_before,
                seen_at=seen_at,
                outbox_depth=_int(fields.get("outbox_depth")),
                outbox_bytes=_int(fields.get("outbox_bytes")),
                held=_int(fields.get("held")),
                last_broker_error=_str(fields.get("last_broker_error")),
                agent_version=_str(fields.get("agent_version")),
            )
        )
    return FleetHealth(
        at=at_ms,
        devices=devices,
        online=online,
        offline=offline,
        stale=stale,
        unscanned=max(0, devices - len(members)),
        stale_after_s=stale_s,
        worst=worst,
        versions=sorted(versions.values(), key=lambda v: (-v.devices, v.version or "")),
    )


async def bridge_replicas(client: RedisLike, at_ms: int) -> list[BridgeReplica]:
    """The replicas that beat within the last hour, newest beat first."""
    rows: Any = await client.zrange(
        BRIDGES_KEY, "+inf", at_ms - BRIDGE_LISTED_FOR_MS, desc=True, byscore=True,
        offset=0, num=BRIDGES_MAX, withscores=True,
    )  # fmt: skip
    async with client.pipeline(transaction=False) as pipe:
        for member, _at in rows:
            pipe.hgetall(bridge_key(text(member)))
        beats = await pipe.execute()
    out = []
    for (member, last), beat in zip(rows, beats, strict=True):
        fields = {text(k): v for k, v in beat.items()}
        at = _int(fields.get("at")) or int(last)
        interval_ms = _int(fields.get("interval_ms")) or DEFAULT_BEAT_MS
        state: BridgeState
        if not fields:
            state = "gone"  # its hash expired: no beat for the TTL
        elif at_ms - at > BRIDGE_STALE_BEATS * interval_ms:
            state = "stale"
        elif fields.get("ready") == b"1":
            state = "ready"
        else:
            state = "not_ready"
        failing = _str(fields.get("failing"))
        out.append(
            BridgeReplica(
                client_id=text(member),
                state=state,
                version=_str(fields.get("version")),
                ready=None if "ready" not in fields else fields["ready"] == b"1",
                redis_durable=(
                    None if "redis_durable" not in fields else fields["redis_durable"] == b"1"
                ),
                in_flight=_int(fields.get("in_flight")),
                failing=failing.split(",") if failing else [],
                at=at,
                age_ms=max(0, at_ms - at),
            )
        )
    return out


class FleetView:
    """The fleet's health, scanned at most every ``max_age_ms`` whoever asks.

    A scan reads one hash per device (about 0.6 s for 10,000 devices on a busy
    2-core machine), so viewers polling every 2 s share one scan instead of
    each paying for it; the lock keeps concurrent callers from scanning twice.
    """

    def __init__(self, stale_s: float = DEFAULT_HEALTH_STALE_S, max_age_ms: int = 5000) -> None:
        self.stale_s = stale_s
        self.max_age_ms = max_age_ms
        self._last: FleetHealth | None = None
        self._lock = asyncio.Lock()

    async def read(self, client: RedisLike) -> FleetHealth:
        """The last scan if recent enough, else a new one."""
        async with self._lock:
            at = now_ms()
            if self._last is None or at - self._last.at >= self.max_age_ms:
                self._last = await fleet_health(client, self.stale_s, at)
            return self._last


FLEET_VIEW: Final = web.AppKey("fleet_view", FleetView)


def redis_durable(bridges: list[BridgeReplica]) -> bool | None:
    """True when every live replica reports Redis durable; None when none is live."""
    live = [b.redis_durable for b in bridges if b.state in ("ready", "not_ready")]
    known = [d for d in live if d is not None]
    return all(known) if known else None


async def summary(
    client: RedisLike, *, shards: int, fleet: FleetView, role: ViewerRole
) -> OpsSummary:
    """The ops page's data, read now."""
    at = now_ms()
    stats = await shard_stats(client, shards)
    async with client.pipeline(transaction=False) as pipe:
        pipe.xlen(PIPELINE_DLQ_STREAM)
        pipe.xlen(DLQ_STREAM)
        dlq_pipeline, dlq_intake = await pipe.execute()
    bridges = await bridge_replicas(client, at)
    return OpsSummary(
        at=at,
        role=role,
        shards=stats,
        totals=totals(stats),
        fleet=await fleet.read(client),
        dlq=DlqSizes(pipeline=int(dlq_pipeline), intake=int(dlq_intake)),
        bridges=bridges,
        redis_durable=redis_durable(bridges),
    )


async def page_file(request: web.Request) -> web.Response:
    """``GET /ops`` and its script and style: static, no data, no token needed."""
    name, content_type = PAGE_FILES[request.path]
    body = resources.files("pipeline").joinpath("static", name).read_bytes()
    return web.Response(body=body, content_type=content_type, charset="utf-8", headers=PAGE_HEADERS)
