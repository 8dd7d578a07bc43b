"""Status recovery: answer a device's status query with its orders' current statuses.

A device publishes :class:`schemas.StatusQuery` to
``v1/devices/{id}/status-query`` for accepted orders whose terminal status it
never heard. Each worker subscribes to the shared query filter; for every
queried id *of the device named in the topic* (a device only learns about
its own orders) whose record has a status a device may hear, the worker
publishes an ordinary :class:`schemas.Status` to the device's status topic.
Unknown ids and orders not yet confirmed get nothing: the device asks again.

The query is acked after the answers' PUBACKs (or their timeout), so a worker
killed mid-answer leaves it for redelivery. Bad queries (undecodable payload,
a topic that is not a device's query topic) are logged, counted and acked:
resending them cannot make them good.
"""

from __future__ import annotations

import asyncio

import structlog
from prometheus_client import CollectorRegistry, Counter
from redis.exceptions import RedisClusterException, RedisError

from schemas import DecodeError, Status, decode_status_query
from schemas.names import device_of_status_query_topic
from servicekit.backoff import Backoff
from servicekit.logs import truncate
from servicekit.mqtt import Ack
from servicekit.redis_clients import text

from ._calls import AnyRedis
from .device_budget import DeviceBudget, throttled_counter
from .names import order_key
from .records import PUBLISHED_STATUSES
from .status import StatusPublisher

log = structlog.get_logger(__name__)

# Queries one device may send a worker a minute (each names at most
# schemas.MAX_QUERIED_ORDERS ids: 100 HMGETs and 100 publishes at most).
DEVICE_PER_MIN = 60.0


class StatusQueryMetrics:
    """Counters of the status-query responder, as ``pipeline_status_queries_*``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kwargs = {"registry": registry} if registry is not None else {}
        self.queries = Counter(
            "pipeline_status_queries",
            "Status queries taken, by outcome (answered, bad_payload, bad_topic)",
            ["outcome"],
            **kwargs,  # type: ignore[arg-type]
        )
        self.answers = Counter(
            "pipeline_status_query_answers",
            "Statuses published again in answer to a status query",
            **kwargs,  # type: ignore[arg-type]
        )


class StatusQueryResponder:
    """Takes queries from the MQTT client (:meth:`take`) and answers them in :meth:`run`."""

    def __init__(
        self,
        redis: AnyRedis,
        publisher: StatusPublisher,
        metrics: StatusQueryMetrics,
        *,
        shards: int,
        backoff: Backoff | None = None,
        device_per_min: float = DEVICE_PER_MIN,
        throttled: Counter | None = None,
    ) -> None:
        self._redis = redis
        self._budget = DeviceBudget(
            "status_query", device_per_min, throttled or throttled_counter()
        )
        self._shards = shards
        self._publisher = publisher
        self._metrics = metrics
        self._backoff = backoff or Backoff(0.05, 5.0)
        # Unbounded by design: the client stops reading at its Receive Maximum.
        self._queue: asyncio.Queue[tuple[str, bytes, Ack]] = asyncio.Queue()

    def take(self, topic: str, payload: bytes, ack: Ack) -> None:
        """The MQTT handler: queue the query (never blocks); one over budget is acked, shed."""
        device_id = device_of_status_query_topic(topic)
        if device_id is not None and not self._budget.allow(device_id):
            ack()  # the device asks again later
            return
        self._queue.put_nowait((topic, payload, ack))

    async def run(self) -> None:
        """Answer queries for ever; Redis errors are retried with backoff, never fatal."""
        while True:
            topic, payload, ack = await self._queue.get()
            while True:
                try:
                    await self.answer(topic, payload)
                except (RedisError, RedisClusterException) as exc:
                    log.warning("status_query_redis_error", error=repr(exc))
                    await self._backoff.wait()
                else:
                    self._backoff.reset()
                    break
            ack()

    async def answer(self, topic: str, payload: bytes) -> int:
        """Publish the known statuses the query asks for; return how many were published."""
        device_id = device_of_status_query_topic(topic)
        if device_id is None:
            self._metrics.queries.labels("bad_topic").inc()
            log.warning("status_query_bad_topic", topic=topic[:200])
            return 0
        try:
            query = decode_status_query(payload)
        except DecodeError as exc:
            self._metrics.queries.labels("bad_payload").inc()
            log.warning("status_query_bad_payload", device_id=device_id, reason=exc.reason,
                        error=str(exc), payload=truncate(payload))  # fmt: skip
            return 0
        order_ids = list(dict.fromkeys(query.order_ids))
        async with self._redis.pipeline(transaction=False) as pipe:
            for order_id in order_ids:
                pipe.hmget(
                    order_key(device_id, order_id, self._shards), ["status", "reason", "updated_at"]
                )
            records = await pipe.execute()
        answers = []
        for order_id, (status, reason, updated_at) in zip(order_ids, records, strict=True):
            if status is None or text(status) not in PUBLISHED_STATUSES:
                continue
            answers.append((device_id, Status(
                v=1, order_id=order_id, status=text(status),  # type: ignore[arg-type]
                reason=text(reason) if reason else None, at=int(updated_at or 0),
            )))  # fmt: skip
        if answers:
            await self._publisher.publish(answers)
        self._metrics.queries.labels("answered").inc()
        self._metrics.answers.inc(len(answers))
        log.info("status_query_answered", device_id=device_id, asked=len(order_ids),
                 answered=len(answers))  # fmt: skip
        return len(answers)
