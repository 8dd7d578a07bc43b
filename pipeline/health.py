"""The fleet-health view: device health messages and MQTT Wills, kept in Redis with TTLs.

Each worker process subscribes to ``$share/health/v1/devices/+/health`` (the
workers split the messages) and writes what a device says about itself, the
device id taken from the topic (the broker's ACL lets a device publish only on
its own topic). The layout, read by the ``/ops`` page (``pipeline/names.py``)::

    health:devices            zset  device_id -> last seen (our clock, ms), any message or Will
    health:oldest             zset  device_id -> oldest_unreceipted_age_ms (0: none, or a Will)
    health:device:{device_id} hash  online "1"/"0", at (device clock), seen_at (our clock),
                                    outbox_depth, outbox_bytes, oldest_unreceipted_age_ms,
                                    held, last_broker_error, agent_version; EXPIRE health TTL

A report (a message with figures) sets the figures it carries and deletes
those it leaves out (``last_broker_error`` absent means none); a Will (no
figures) sets only ``online=0``, ``at`` and ``seen_at``, keeping the last
known figures. Every command names one key, so it runs unchanged on Redis
Cluster; a sweep every :data:`SWEEP_EVERY_S` drops devices silent for longer
than the TTL from both zsets and refreshes the online/offline gauge.

A message is acked after Redis has it (a Redis outage retries with backoff,
holding the acks); bad messages (a topic that is no device's health topic, an
undecodable payload) are counted, logged with the reason and acked: resending
cannot make them good.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.exceptions import RedisError

from schemas import DecodeError, Health, decode_health
from schemas.names import device_of_health_topic
from servicekit.backoff import Backoff
from servicekit.clock import now_ms
from servicekit.logs import truncate
from servicekit.mqtt import Ack
from servicekit.redis_clients import text

from ._calls import AnyRedis
from .device_budget import DeviceBudget, throttled_counter
from .names import HEALTH_DEVICES_KEY, HEALTH_OLDEST_KEY, health_device_key

log = structlog.get_logger(__name__)

FIGURES: Final = (
    "outbox_depth",
    "outbox_bytes",
    "oldest_unreceipted_age_ms",
    "held",
    "last_broker_error",
    "agent_version",
)
# Sane ranges of a report's figures, far above what an agent can reach (its outbox
# defaults to 100,000 rows and 64 MiB; nothing stays unreceipted past the dedup TTL):
# a figure beyond them is a bug or a lie, and the ops page would print it.
MAX_OUTBOX_ROWS: Final = 100_000_000
MAX_OUTBOX_BYTES: Final = 1 << 40
MAX_UNRECEIPTED_AGE_MS: Final = 30 * 24 * 3600 * 1000
DEVICE_PER_MIN: Final = 90.0  # an agent: ≤ 1 a second on change, plus its interval reports
CLOCK_TOLERANCE_S: Final = 3600.0
SWEEP_EVERY_S: Final = 15.0
BATCH_MAX: Final = 500  # messages written (and acked) per Redis round trip
_SCAN_COUNT: Final = 1000

Message = tuple[str, bytes, Ack]


class HealthMetrics:
    """``pipeline_health_*``: messages taken, bad ones by reason, devices by state."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kwargs: dict[str, Any] = {"registry": registry} if registry is not None else {}
        self.messages = Counter(
            "pipeline_health_messages",
            "Device health messages written, by kind (report, offline, will)",
            ["kind"],
            **kwargs,
        )
        self.invalid = Counter(
            "pipeline_health_invalid",
            "Health messages refused, by reason (bad_topic, the decoder's reason code, or a "
            "figure out of range: at_in_future, at_too_old, count_out_of_range, "
            "age_out_of_range)",
            ["reason"],
            **kwargs,
        )
        # Every worker sweeps the same Redis view: the multiprocess value is the max.
        self.devices = Gauge(
            "pipeline_health_devices",
            "Devices in the fleet-health view by state (online, offline), as of the last sweep",
            ["state"],
            multiprocess_mode="livemax",
            **kwargs,
        )


def out_of_range(health: Health, now_ms: int, tolerance_ms: int, ttl_ms: int) -> str | None:
    """The reason code of a figure outside its sane range, None when all are sane.

    ``at`` may be at most ``tolerance_ms`` ahead of our clock; a report's ``at``
    at most ``tolerance_ms`` plus the view's TTL behind it (a Will's ``at`` is
    its CONNECT's, which may be any age).
    """
    if health.at > now_ms + tolerance_ms:
        return "at_in_future"
    if not is_will(health) and health.at < now_ms - tolerance_ms - ttl_ms:
        return "at_too_old"
    for name in ("outbox_depth", "held"):
        value = getattr(health, name)
        if value is not None and value > MAX_OUTBOX_ROWS:
            return "count_out_of_range"
    if health.outbox_bytes is not None and health.outbox_bytes > MAX_OUTBOX_BYTES:
        return "count_out_of_range"
    age = health.oldest_unreceipted_age_ms
    if age is not None and age > MAX_UNRECEIPTED_AGE_MS:
        return "age_out_of_range"
    return None


def is_will(health: Health) -> bool:
    """A message without any figure: the MQTT Will (or a device that says only that much)."""
    return all(getattr(health, name) is None for name in FIGURES)


class HealthConsumer:
    """Takes health messages from the MQTT client (:meth:`take`) and writes them in :meth:`run`.

    Args:
        redis: a client of a single Redis or of a Redis Cluster.
        metrics: where the counts go.
        ttl_s: how long a silent device stays in the view.
        sweep_every_s: how often stale devices are dropped and the gauge refreshed.
        clock: ms now (the consumer's clock, ``seen_at`` and the zset scores).
        device_per_min: messages (reports and Wills) a device may send a minute, up to a
            minute's worth at once; past it they are shed unwritten (0: no limit).
        clock_tolerance_s: how far a device's ``at`` may be ahead of ours.
        throttled: the ``pipeline_device_throttled`` counter (default: the global one).
    """

    def __init__(
        self,
        redis: AnyRedis,
        metrics: HealthMetrics,
        *,
        ttl_s: float,
        sweep_every_s: float = SWEEP_EVERY_S,
        clock: Callable[[], int] = now_ms,
        backoff: Backoff | None = None,
        device_per_min: float = DEVICE_PER_MIN,
        clock_tolerance_s: float = CLOCK_TOLERANCE_S,
        throttled: Counter | None = None,
    ) -> None:
        self._redis = redis
        self._metrics = metrics
        self._budget = DeviceBudget("health", device_per_min, throttled or throttled_counter())
        self._tolerance_ms = int(clock_tolerance_s * 1000)
        self._ttl_ms = max(1000, int(ttl_s * 1000))
        self._sweep_every_s = sweep_every_s
        self._clock = clock
        self._backoff = backoff or Backoff(0.05, 5.0)
        # Unbounded by design: the MQTT client stops reading at its Receive Maximum.
        self._queue: asyncio.Queue[Message] = asyncio.Queue()

    def take(self, topic: str, payload: bytes, ack: Ack) -> None:
        """The MQTT handler: queue the message (never blocks); one over budget is acked, shed."""
        device_id = device_of_health_topic(topic)
        if device_id is not None and not self._budget.allow(device_id):
            ack()
            return
        self._queue.put_nowait((topic, payload, ack))

    async def run(self) -> None:
        """Write messages and sweep, for ever; Redis errors are retried, never fatal."""
        async with asyncio.TaskGroup() as loops:
            loops.create_task(self._write_forever(), name="health-writer")
            loops.create_task(self._sweep_forever(), name="health-sweeper")

    async def _write_forever(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH_MAX and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            while True:
                try:
                    await self.write([(topic, payload) for topic, payload, _ in batch])
                except RedisError as exc:
                    log.warning("health_redis_error", error=repr(exc), batch=len(batch))
                    await self._backoff.wait()
                else:
                    self._backoff.reset()
                    break
            for _, _, ack in batch:
                ack()

    async def write(self, messages: list[tuple[str, bytes]]) -> int:
        """Write the valid messages' figures to Redis; return how many were valid.

        Raises:
            RedisError: nothing is counted then; the caller retries the batch.
        """
        now = self._clock()
        valid: list[tuple[str, Health]] = []
        for topic, payload in messages:
            parsed = self._parse(topic, payload)
            if parsed is None:
                continue
            reason = out_of_range(parsed[1], now, self._tolerance_ms, self._ttl_ms)
            if reason is not None:
                self._metrics.invalid.labels(reason).inc()
                log.warning("health_out_of_range", device_id=parsed[0], reason=reason,
                            payload=truncate(payload))  # fmt: skip
                continue
            valid.append(parsed)
        if not valid:
            return 0
        ttl_ms = self._ttl_ms
        async with self._redis.pipeline(transaction=False) as pipe:
            for device_id, health in valid:
                key = health_device_key(device_id)
                fields: dict[str, str | int] = {
                    "online": "1" if health.online else "0",
                    "at": health.at,
                    "seen_at": now,
                }
                will = is_will(health)
                if not will:
                    absent = []
                    for name in FIGURES:
                        value = getattr(health, name)
                        if value is None:
                            absent.append(name)
                        else:
                            fields[name] = value
                    if absent:
                        pipe.hdel(key, *absent)
                oldest = 0 if will else health.oldest_unreceipted_age_ms or 0
                pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
                pipe.pexpire(key, ttl_ms)
                pipe.zadd(HEALTH_DEVICES_KEY, {device_id: now})
                pipe.zadd(HEALTH_OLDEST_KEY, {device_id: oldest})
            await pipe.execute()
        for device_id, health in valid:
            kind = "report" if health.online else "will" if is_will(health) else "offline"
            self._metrics.messages.labels(kind).inc()
            if not health.online:
                log.info("device_offline", device_id=device_id, kind=kind, at=health.at)
        return len(valid)

    def _parse(self, topic: str, payload: bytes) -> tuple[str, Health] | None:
        device_id = device_of_health_topic(topic)
        if device_id is None:
            self._metrics.invalid.labels("bad_topic").inc()
            log.warning("health_bad_topic", topic=topic[:200])
            return None
        try:
            return device_id, decode_health(payload)
        except DecodeError as exc:
            self._metrics.invalid.labels(exc.reason).inc()
            log.warning("health_bad_payload", device_id=device_id, reason=exc.reason,
                        error=str(exc), payload=truncate(payload))  # fmt: skip
            return None

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except RedisError as exc:
                log.warning("health_sweep_redis_error", error=repr(exc))
            await asyncio.sleep(self._sweep_every_s)

    async def sweep(self) -> tuple[int, int, int]:
        """Drop devices silent past the TTL; return (dropped, online, offline) and set the gauge.

        Each step names one key. A device heard again in the instant between the
        zmscore and the zrem of its ``health:oldest`` entry loses that entry until
        its next message: harmless, and the price of working on a cluster.
        """
        cutoff = self._clock() - self._ttl_ms
        dropped = int(await self._redis.zremrangebyscore(HEALTH_DEVICES_KEY, "-inf", cutoff))
        async for chunk in self._scan(HEALTH_OLDEST_KEY):
            scores = await self._redis.zmscore(HEALTH_DEVICES_KEY, chunk)
            orphans = [m for m, score in zip(chunk, scores, strict=True) if score is None]
            if orphans:
                await self._redis.zrem(HEALTH_OLDEST_KEY, *orphans)
        online = offline = 0
        async for chunk in self._scan(HEALTH_DEVICES_KEY):
            async with self._redis.pipeline(transaction=False) as pipe:
                for member in chunk:
                    pipe.hget(health_device_key(member), "online")
                flags = await pipe.execute()
            up = sum(1 for flag in flags if flag is not None and text(flag) == "1")
            online += up
            offline += len(chunk) - up
        self._metrics.devices.labels("online").set(online)
        self._metrics.devices.labels("offline").set(offline)
        if dropped:
            log.info("health_devices_expired", count=dropped, ttl_s=self._ttl_ms / 1000)
        return dropped, online, offline

    async def _scan(self, key: str) -> AsyncIterator[list[str]]:
        """Chunks of a zset's members (str), by ZSCAN."""
        cursor = 0
        while True:
            cursor, pairs = await self._redis.zscan(key, cursor, count=_SCAN_COUNT)
            if pairs:
                yield [text(member) for member, _ in pairs]  # type: ignore[arg-type]
            if cursor == 0:
                return
