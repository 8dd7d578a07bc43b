"""Geo mode: write each order into its authority region's Redis (GEO.md).

An order's authority is ``attempts[0]``, or this region when the order names
none. The bridge validates every order as usual; :meth:`Regions.route` then
says where it goes:

- this region: the local :class:`~bridge.batcher.Batcher`, exactly as without
  geo mode (retried until Redis has it);
- another configured region: that region's :class:`RemoteBatcher`, which runs
  the *same* dedup + append script against the remote Redis, once, within
  ``region_timeout_s``. Any failure (timeout, connection error, open circuit
  breaker) writes nothing anywhere and answers ``pending``
  (``authority_unreachable``); the device keeps the order and retries later.
  A timeout leaves the write in doubt, which is harmless: the script is
  idempotent, so the retry answers ``duplicate``;
- a region nobody configured (agents configured before this bridge, or a
  typo): :data:`UNKNOWN`, a ``pending`` receipt with reason ``unknown_region``;
  nothing is written anywhere, the metric and the log line name the region.
  The order is valid: the device keeps it and resends it with its backoff,
  and it lands once the bridge is restarted knowing the region.

Remote writes have a writer task per region, apart from the local group
commit, so a remote region that times out never delays local orders. A
conflict found remotely becomes a dead letter in the *local* DLQ (the DLQ
holds what this bridge refused; only orders go to the authority).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from redis.exceptions import TimeoutError as RedisTimeoutError

from schemas import Reason
from schemas.names import orders_topic

from .batcher import ACCEPTED, DUPLICATE, Batcher, Done, Outcome
from .breaker import BreakerState, CircuitBreaker
from .config import BridgeConfig
from .dlq_budget import dlq_entries
from .errors import StoreError
from .ingest import Classified, DeadLetter, ValidOrder
from .metrics import BridgeMetrics
from .store import AppendResult, OrderSink, RedisSink

log = structlog.get_logger(__name__)

PENDING: Final = Outcome("pending", Reason.AUTHORITY_UNREACHABLE)
UNKNOWN: Final = Outcome("pending", Reason.UNKNOWN_REGION)
# Region names in attempts[0] come from devices: past this many distinct names the
# metric label is `other` (bounded series), and one log line per name per interval.
UNKNOWN_LABELS_MAX: Final = 32
UNKNOWN_LOG_EVERY_S: Final = 60.0
PROBE_INTERVAL_S: Final = 1.0
_SECONDS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

OnConflict = Callable[[DeadLetter, Done], None]


class RegionMetrics:
    """Prometheus metrics of the cross-region writes, labelled by remote region."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.write_seconds = Histogram(
            "bridge_region_write_seconds",
            "one batch written into a remote region's Redis (successful writes)",
            ["region"],
            buckets=_SECONDS,
            registry=r,
        )
        self.failures = Counter(
            "bridge_region_failures",
            "cross-region batches not written, by cause (timeout, error, breaker_open)",
            ["region", "cause"],
            registry=r,
        )
        self.orders = Counter(
            "bridge_region_orders",
            "orders sent to a remote authority, by result (accepted, duplicate, conflict, pending)",
            ["region", "result"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "bridge_region_breaker_state",
            "circuit breaker per remote region: 0 closed, 1 half-open, 2 open",
            ["region"],
            registry=r,
        )
        self.reachable = Gauge(
            "bridge_region_reachable",
            "1 when the last probe of a remote region's Redis answered in time",
            ["region"],
            registry=r,
        )
        self.unknown = Counter(
            "bridge_region_unknown",
            "orders answered `pending` because attempts[0] names no configured region, "
            f"by that name (`other` past {UNKNOWN_LABELS_MAX} names)",
            ["region"],
            registry=r,
        )


class RemoteBatcher(Batcher):
    """Group commit into one remote region's Redis: one try per batch, ``pending`` on failure.

    The buffering and drain logic are the local :class:`Batcher`'s. Unlike it,
    up to ``concurrency`` batches are in flight at once: across a WAN one
    write in flight would make an order that arrives during a write wait for
    that write's round trip and then its own (the bench measured ~2 RTT at
    p50). Batches in flight hold different messages; the script is atomic per
    order, so a resend racing its first copy is still appended once.
    Nothing is retried here: the device's resend is the retry, and meanwhile
    it holds the order.
    """

    def __init__(
        self,
        region: str,
        sink: OrderSink,
        metrics: BridgeMetrics,
        region_metrics: RegionMetrics,
        breaker: CircuitBreaker,
        *,
        timeout_s: float,
        max_batch: int,
        on_conflict: OnConflict,
        on_written: Callable[[], None] | None = None,
        concurrency: int = 1,
    ) -> None:
        super().__init__(
            sink,
            metrics,
            max_batch=max_batch,
            max_delay_s=0.0,
            backoff_max_s=1.0,
            trim_every_batches=0,  # the authority's own bridges trim its streams
            on_written=on_written,
        )
        self.region = region
        self.breaker = breaker
        self._region_metrics = region_metrics
        self._timeout_s = timeout_s
        self._on_conflict = on_conflict
        self.last_error: str | None = None
        self._slots = asyncio.Semaphore(concurrency)
        self._writing = 0  # batches in flight
        region_metrics.breaker_state.labels(region).set(breaker.state)

    async def run(self) -> None:
        """Write batches, up to ``concurrency`` at once, until closed or cancelled."""
        async with asyncio.TaskGroup() as writes:
            while not self._closed:
                await self._wake.wait()
                if self._closed:
                    break
                await self._slots.acquire()  # meanwhile the next batch fills up
                batch = self._buffer[: self._max_batch]
                del self._buffer[: self._max_batch]
                if not self._buffer:
                    self._wake.clear()
                if not batch:
                    self._slots.release()
                    continue
                self._writing += 1
                writes.create_task(self._write_one(batch), name=f"region-write-{self.region}")

    async def _write_one(self, batch: list[tuple[Classified, Done]]) -> None:
        try:
            await self._write(batch)
        finally:
            self._writing -= 1
            self._slots.release()
            if self._on_written is not None:
                self._on_written()
            if not self._buffer and not self._writing:
                self._idle.set()

    async def _write(self, batch: list[tuple[Classified, Done]]) -> None:
        orders = [(item, done) for item, done in batch if isinstance(item, ValidOrder)]
        region, metrics = self.region, self._region_metrics
        if not self.breaker.allow():
            metrics.failures.labels(region, "breaker_open").inc()
            self._all_pending(orders)
            return
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s):
                results = await self._sink.write([o for o, _ in orders], [], trim_shards=set())
        except Exception as exc:  # every failure means the same: pending
            self._write_failed(exc)
            self._all_pending(orders)
            return
        finally:
            metrics.breaker_state.labels(region).set(self.breaker.state)
        self.mark_reachable()
        metrics.write_seconds.labels(region).observe(time.perf_counter() - started)
        for (order, done), result in zip(orders, results, strict=True):
            if result is AppendResult.APPENDED:
                metrics.orders.labels(region, "accepted").inc()
                self._settle(done, ACCEPTED)
            elif result is AppendResult.DUPLICATE:
                metrics.orders.labels(region, "duplicate").inc()
                self._settle(done, DUPLICATE)
            else:
                metrics.orders.labels(region, "conflict").inc()
                self.pending -= 1
                letter = DeadLetter(
                    Reason.CONFLICT,
                    orders_topic(order.device_id),
                    order.payload,
                    order.received_at_ms,
                    order.device_id,
                    order.order_id,
                )
                self._on_conflict(letter, done)

    def _write_failed(self, exc: Exception) -> None:
        timed_out = isinstance(exc, TimeoutError) or isinstance(exc.__cause__, RedisTimeoutError)
        cause = "timeout" if timed_out else "error"
        if not isinstance(exc, (StoreError, TimeoutError)):
            log.exception("unexpected error writing to a remote region", region=self.region)
        self._region_metrics.failures.labels(self.region, cause).inc()
        was_open = self.breaker.state is BreakerState.OPEN
        self.breaker.record_failure()
        self.last_error = f"{cause}: {exc}" if str(exc) else cause
        if self.breaker.state is BreakerState.OPEN and not was_open:
            log.warning("remote region unreachable: circuit breaker open, answering pending",
                        region=self.region, error=self.last_error,
                        failures=self.breaker.failures)  # fmt: skip

    def mark_reachable(self) -> None:
        """A write (or the breaker's trial probe) worked: close the breaker."""
        if self.breaker.failures:
            log.info("remote region writes work again", region=self.region)
        self.breaker.record_success()
        self.last_error = None
        self._region_metrics.breaker_state.labels(self.region).set(self.breaker.state)

    def _all_pending(self, orders: list[tuple[ValidOrder, Done]]) -> None:
        self._region_metrics.orders.labels(self.region, "pending").inc(len(orders))
        for _, done in orders:
            self._settle(done, PENDING)


@dataclass(eq=False)
class RemoteRegion:
    """One remote region: its Redis, breaker, writer and what the last probe saw."""

    name: str
    sink: OrderSink
    breaker: CircuitBreaker
    batcher: RemoteBatcher
    reachable: bool | None = None  # None: not probed yet
    probe_error: str | None = None


class Regions:
    """Routes orders to their authority region and owns the remote writers.

    Args:
        config: the bridge's settings (geo mode).
        sinks: a sink per *remote* region (the caller owns their connections).
        metrics: the bridge's metrics (the region metrics join its registry).
        on_conflict: where a dead letter found remotely goes (the local batcher's ``add``).
        on_written: called after each remote batch is answered (the bridge resumes reading
            when it paused for in-flight work).
    """

    def __init__(
        self,
        config: BridgeConfig,
        sinks: Mapping[str, OrderSink],
        metrics: BridgeMetrics,
        *,
        on_conflict: OnConflict,
        on_written: Callable[[], None] | None = None,
    ) -> None:
        self.own = config.region
        self.metrics = RegionMetrics(metrics.registry)
        self._timeout_s = config.region_timeout_s
        remote_names = set(config.region_urls()) - {self.own}
        if set(sinks) != remote_names:
            raise ValueError(f"need one sink per remote region {sorted(remote_names)}, "
                             f"got {sorted(sinks)}")  # fmt: skip
        self._closed = False
        self._unknown_seen: set[str] = set()  # metric labels given out
        self._unknown_logged: dict[str, float] = {}  # label -> monotonic time of its last log
        self.remotes: dict[str, RemoteRegion] = {}
        for name, sink in sinks.items():
            breaker = CircuitBreaker(
                failure_threshold=config.region_breaker_failures,
                open_s=config.region_breaker_open_s,
            )
            batcher = RemoteBatcher(
                name,
                sink,
                metrics,
                self.metrics,
                breaker,
                timeout_s=config.region_timeout_s,
                max_batch=config.batch_max,
                on_conflict=on_conflict,
                on_written=on_written,
                concurrency=config.region_write_concurrency,
            )
            self.remotes[name] = RemoteRegion(name, sink, breaker, batcher)

    def route(self, order: ValidOrder) -> RemoteBatcher | Outcome | None:
        """Where ``order`` goes: None (this region), a remote writer, or :data:`UNKNOWN`.

        :data:`UNKNOWN` is the answer itself: the caller sends it and writes nothing.
        """
        authority = order.authority
        if authority is None or authority == self.own:
            return None
        remote = self.remotes.get(authority)
        if remote is not None:
            return remote.batcher
        self._unknown_region(authority, order.device_id)
        return UNKNOWN

    def _unknown_region(self, name: str, device_id: str) -> None:
        label = name
        if name not in self._unknown_seen and len(self._unknown_seen) >= UNKNOWN_LABELS_MAX:
            label = "other"
        self._unknown_seen.add(label)
        self.metrics.unknown.labels(label).inc()
        now = time.monotonic()
        last = self._unknown_logged.get(label)
        if last is None or now - last >= UNKNOWN_LOG_EVERY_S:
            self._unknown_logged[label] = now
            log.error(
                "order owned by a region this bridge does not know: answering pending, "
                "writing nothing; add it with --region-redis NAME=REDIS_URL",
                region=name,
                known=sorted({self.own, *self.remotes}),
                device_id=device_id,
            )

    @property
    def pending(self) -> int:
        """Orders handed to remote writers and not yet answered."""
        return sum(remote.batcher.pending for remote in self.remotes.values())

    async def run(self) -> None:
        """Run every remote writer and the reachability probe until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            for remote in self.remotes.values():
                tasks.create_task(remote.batcher.run(), name=f"region-writer-{remote.name}")
            tasks.create_task(self._probe_forever(), name="region-probe")

    async def drain(self) -> None:
        """Wait until every remote writer has answered what it holds."""
        await asyncio.gather(*(remote.batcher.drain() for remote in self.remotes.values()))

    def close(self) -> None:
        """Stop the remote writers after the batch in hand, and the probe.

        Cancelling alone is not enough on Python 3.11: a cancellation that lands
        as a probe's timeout fires turns into a TimeoutError, which the probe
        takes for an unreachable region, and the loop would run on.
        """
        self._closed = True
        for remote in self.remotes.values():
            remote.batcher.close()

    async def _probe_forever(self) -> None:
        while not self._closed:
            await self.probe()
            await asyncio.sleep(PROBE_INTERVAL_S)

    async def probe(self) -> None:
        """Ping every remote Redis once (concurrently); an open breaker's trial is this ping."""
        await asyncio.gather(*(self._probe(remote) for remote in self.remotes.values()))

    async def _probe(self, remote: RemoteRegion) -> None:
        # A breaker whose open time is up takes the probe as its trial, so it closes
        # again without waiting for an order (and an order is not the one that waits).
        trial = remote.breaker.state is BreakerState.HALF_OPEN and remote.breaker.allow()
        try:
            async with asyncio.timeout(self._timeout_s):
                await remote.sink.ping()
        except Exception as exc:  # any failure: unreachable
            if remote.reachable is not False:
                log.warning("remote region unreachable", region=remote.name, error=repr(exc))
            remote.reachable = False
            remote.probe_error = repr(exc)
            if trial:
                remote.breaker.record_failure()
        else:
            if remote.reachable is False:
                log.info("remote region reachable again", region=remote.name)
            remote.reachable = True
            remote.probe_error = None
            if trial:
                remote.batcher.mark_reachable()
        self.metrics.reachable.labels(remote.name).set(1 if remote.reachable else 0)
        self.metrics.breaker_state.labels(remote.name).set(remote.breaker.state)

    def status(self) -> dict[str, Any]:
        """What ``/readyz`` reports per region (facts; readiness is the own Redis only)."""
        regions: dict[str, Any] = {self.own: {"local": True}}
        for remote in self.remotes.values():
            regions[remote.name] = {
                "local": False,
                "reachable": remote.reachable,
                "breaker": remote.breaker.state.label,
                "breaker_failures": remote.breaker.failures,
                "last_write_error": remote.batcher.last_error,
                "last_probe_error": remote.probe_error,
                "pending": remote.batcher.pending,
            }
        unknown = sorted(self._unknown_seen)
        return {"region": self.own, "regions": regions, "unknown_regions": unknown}


def build_region_sinks(config: BridgeConfig) -> dict[str, RedisSink]:
    """A :class:`RedisSink` per remote region, timing out after ``region_timeout_s``."""
    return {
        name: RedisSink(
            url,
            cluster=config.redis_cluster,
            dedup_ttl_s=config.dedup_ttl_s,
            dlq_maxlen=dlq_entries(config.dlq_max_bytes, 0, config.dlq_maxlen),
            timeout_s=config.region_timeout_s,
            min_replicas=config.redis_min_replicas,
            replica_timeout_ms=config.redis_replica_timeout_ms,
            lanes=2,
        )
        for name, url in config.region_urls().items()
        if name != config.region
    }
