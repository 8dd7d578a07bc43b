"""Prometheus metrics: what workers count, and what the API reads from Redis at scrape time.

Worker processes started by ``order-pipeline --workers K`` write their metrics
to ``PROMETHEUS_MULTIPROC_DIR``; the API process that serves ``/metrics`` adds
them up with prometheus-client's multiprocess collector.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from redis.exceptions import ResponseError

from schemas.names import DLQ_STREAM, PIPELINE_GROUP, stream_key
from servicekit.redis_clients import text

from ._calls import AnyRedis
from .names import PIPELINE_DLQ_STREAM

STEP_BUCKETS_S: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"


class WorkerMetrics:
    """The counters and histograms one worker updates."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.registry = registry  # None: prometheus-client's default registry
        kwargs = {"registry": registry} if registry is not None else {}
        self.processed = Counter(
            "pipeline_orders_processed_total",
            "Entries finished by this pipeline, by outcome (final status, dead_lettered, skipped)",
            ["outcome"],
            **kwargs,  # type: ignore[arg-type]
        )
        self.step_seconds = Histogram(
            "pipeline_step_seconds",
            "Time one step took for one batch",
            ["step"],
            buckets=STEP_BUCKETS_S,
            **kwargs,  # type: ignore[arg-type]
        )
        self.reclaimed = Counter(
            "pipeline_reclaimed_total",
            "Pending entries taken over from idle consumers",
            **kwargs,  # type: ignore[arg-type]
        )
        self.dead_lettered = Counter(
            "pipeline_dead_lettered_total",
            "Entries moved to the DLQ, by reason",
            ["reason"],
            **kwargs,  # type: ignore[arg-type]
        )
        self.step_errors = Counter(
            "pipeline_step_errors_total",
            "Orders a step raised on (left pending for redelivery)",
            ["step"],
            **kwargs,  # type: ignore[arg-type]
        )


class ApiMetrics:
    """Gauges the API fills from Redis on each scrape: pending and lag per shard, DLQ size."""

    def __init__(self, shards: int) -> None:
        self.shards = shards
        self.registry = CollectorRegistry()
        self.pending = Gauge(
            "pipeline_pending", "Entries delivered but not acked", ["shard"], registry=self.registry
        )
        self.lag = Gauge(
            "pipeline_lag",
            "Entries not yet delivered to the group",
            ["shard"],
            registry=self.registry,
        )
        self.dlq_size = Gauge("pipeline_dlq_size", "Entries in orders:dlq", registry=self.registry)
        self.dead_letters = Gauge(
            "pipeline_dead_letters",
            "Entries in pipeline:dlq (never trimmed)",
            registry=self.registry,
        )

    async def refresh(self, client: AnyRedis) -> None:
        """Read XINFO GROUPS of every shard and XLEN of the DLQ (one round trip)."""
        async with client.pipeline(transaction=False) as pipe:
            for shard in range(self.shards):
                pipe.xinfo_groups(stream_key(shard))
            pipe.xlen(DLQ_STREAM)
            pipe.xlen(PIPELINE_DLQ_STREAM)
            replies = await pipe.execute(raise_on_error=False)
        for shard, groups in enumerate(replies[: self.shards]):
            pending = lag = 0
            if not isinstance(groups, ResponseError):  # the stream may not exist yet
                for group in groups:
                    if text(group["name"]) == PIPELINE_GROUP:
                        pending = int(group.get("pending") or 0)
                        lag = int(group.get("lag") or 0)
            self.pending.labels(shard=str(shard)).set(pending)
            self.lag.labels(shard=str(shard)).set(lag)
        dlq, dead = replies[-2], replies[-1]
        self.dlq_size.set(0 if isinstance(dlq, ResponseError) else int(dlq))
        self.dead_letters.set(0 if isinstance(dead, ResponseError) else int(dead))

    def exposition(
        self, worker_registry: CollectorRegistry | None, multiproc_dir: str | None
    ) -> bytes:
        """Text format of the gauges plus the workers' metrics (in-process or multiprocess)."""
        body = generate_latest(self.registry)
        if multiproc_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, multiproc_dir)  # type: ignore[no-untyped-call]
            body += generate_latest(registry)
        elif worker_registry is not None:
            body += generate_latest(worker_registry)
        return body
