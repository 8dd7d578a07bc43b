"""Gather messages into batches and write each batch to Redis in one round trip.

Every added message carries a ``done`` callback, called with its outcome only
once Redis holds it (the order, or its dead letter); only then may its MQTT
PUBACK go out. A failed round trip is retried with
:class:`servicekit.backoff.Backoff` (capped full jitter, reset after every
success) for as long as it takes, however long Redis is away: the messages
are not acknowledged meanwhile, so the broker keeps them and stops sending
more once our Receive Maximum is reached.
The bridge bounds the messages held here (``pending``) by pausing the
intake's reads above a limit; ``on_written`` tells it when to resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import structlog

from schemas import Reason
from schemas.messages import ReceiptResult
from schemas.names import orders_topic
from servicekit import tracing
from servicekit.backoff import Backoff

from .errors import RedisAuthError, RedisFullError, ReplicasShortfall, StoreError
from .ingest import Classified, DeadLetter, ValidOrder
from .metrics import BridgeMetrics
from .store import AppendResult, OrderSink

log = structlog.get_logger(__name__)
BACKOFF_BASE_S = 0.01
LOG_EVERY_FAILURES = 1000  # during a long outage, one warning per this many failed tries


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the device is told about one message."""

    result: ReceiptResult
    reason: str | None = None


ACCEPTED = Outcome("accepted")
DUPLICATE = Outcome("duplicate")

Done = Callable[[Outcome], None]
_Entry = tuple[Classified, Done]


def _links(batch: list[_Entry]) -> Iterator[tuple[str | None, dict[str, str]]]:
    """The batch span's links: each sampled order's context (consumed only when tracing is on)."""
    for item, _ in batch:
        trace = item.trace if isinstance(item, ValidOrder) else None
        if trace is not None and tracing.is_sampled(trace):
            yield trace, {"order.id": item.order_id or "", "device.id": item.device_id or ""}


class Batcher:
    """Collects messages and writes them in batches of up to ``max_batch`` (group commit).

    One write is in flight at a time. When none is, whatever is buffered goes
    out at once: a lone order at light load waits for no timer. Messages that
    arrive during a write form the next batch, so batches grow with the load
    by themselves. Only right after a full batch (a backlog is draining) does
    the next one wait, up to ``max_delay_s``, to fill up too.

    Run :meth:`run` as a task; :meth:`add` messages from the intake.
    """

    def __init__(
        self,
        sink: OrderSink,
        metrics: BridgeMetrics,
        *,
        max_batch: int,
        max_delay_s: float,
        backoff_max_s: float,
        trim_every_batches: int,
        on_written: Callable[[], None] | None = None,
    ) -> None:
        self._sink = sink
        self._metrics = metrics
        self._max_batch = max_batch
        self._max_delay_s = max_delay_s
        self._backoff = Backoff(min(BACKOFF_BASE_S, backoff_max_s), backoff_max_s)
        self._trim_every = trim_every_batches
        self._on_written = on_written
        self._buffer: list[_Entry] = []
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._last_full = False  # the last batch written had max_batch messages
        self._shard_batches: defaultdict[int, int] = defaultdict(int)
        self.redis_ok = True
        self.redis_error: StoreError | None = None  # the last failure, while it lasts
        self.failures = 0  # consecutive failed round trips
        self.pending = 0  # added and not yet written
        self.peak_pending = 0

    def add(self, item: Classified, done: Done) -> None:
        """Queue one message; ``done(outcome)`` runs once Redis holds it."""
        self._buffer.append((item, done))
        self.pending += 1
        self.peak_pending = max(self.peak_pending, self.pending)
        self._idle.clear()
        self._wake.set()
        if len(self._buffer) >= self._max_batch:
            self._full.set()

    async def drain(self) -> None:
        """Wait until everything submitted so far is written."""
        await self._idle.wait()

    def close(self) -> None:
        """Stop :meth:`run` after the batch in hand (shutdown, after :meth:`drain`).

        Cancelling alone is not enough on Python 3.11: a cancellation that lands
        as the batch-delay timeout fires can be lost, and the writer would run on.
        """
        self._closed = True
        self._wake.set()

    async def run(self) -> None:
        """Write batches until closed or cancelled."""
        while not self._closed:
            await self._wake.wait()
            if self._closed:
                return
            if self._last_full and len(self._buffer) < self._max_batch and self._max_delay_s > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._max_delay_s):
                        await self._full.wait()
            batch = self._buffer[: self._max_batch]
            del self._buffer[: self._max_batch]
            if len(self._buffer) < self._max_batch:
                self._full.clear()
            if not self._buffer:
                self._wake.clear()
            self._last_full = len(batch) >= self._max_batch
            if batch:
                # One span per batch, linked to each sampled order (nothing when tracing is off).
                with tracing.batch_span("bridge batch", _links(batch)):
                    await self._write(batch)
                if self._on_written is not None:
                    self._on_written()
            if not self._buffer:
                self._idle.set()

    async def _write(self, batch: list[_Entry]) -> None:
        started = time.perf_counter()
        self._metrics.batch_size.observe(len(batch))
        orders = [(item, done) for item, done in batch if isinstance(item, ValidOrder)]
        dead = [(item, done) for item, done in batch if isinstance(item, DeadLetter)]
        attempt = 0
        held: list[AppendResult] | None = None  # written, waiting for replicas
        while orders or dead:
            trim = self._shards_to_trim(orders) if attempt == 0 else set()
            call_started = time.perf_counter()
            try:
                # After a replica shortfall the batch is written again, not only
                # waited for: the retry may reach another node (a Sentinel failover,
                # a frozen master resuming), and a WAIT there says nothing of the
                # node that took the first write, which a resync may discard.
                results = await self._sink.write(
                    [o for o, _ in orders], [d for d, _ in dead], trim_shards=trim
                )
                if held is not None:
                    results = _merge_held(held, results)
            except Exception as exc:
                if isinstance(exc, ReplicasShortfall):
                    held = exc.results if held is None else _merge_held(held, exc.results)
                self._failed(exc, attempt)
                await self._backoff.wait()
                attempt += 1
                continue
            self._metrics.redis_rtt.observe(time.perf_counter() - call_started)
            self._recovered()
            held = None
            conflicts: list[tuple[DeadLetter, Done]] = []
            accepted = duplicates = 0
            for (order, done), result in zip(orders, results, strict=True):
                if result is AppendResult.APPENDED:
                    accepted += 1
                    self._settle(done, ACCEPTED)
                elif result is AppendResult.DUPLICATE:
                    duplicates += 1
                    self._settle(done, DUPLICATE)
                else:
                    letter = DeadLetter(
                        Reason.CONFLICT,
                        orders_topic(order.device_id),
                        order.payload,
                        order.received_at_ms,
                        order.device_id,
                        order.order_id,
                    )
                    conflicts.append((letter, done))
            self._metrics.accepted.inc(accepted)
            self._metrics.duplicates.inc(duplicates)
            for letter, done in dead:
                self._metrics.rejected.labels(letter.reason).inc()
                self._settle(done, Outcome("rejected", letter.reason))
            # A conflict's marker already exists, so a retry of the script would
            # answer "conflict" again: only its dead letter is still to write.
            orders, dead = [], conflicts
        self._metrics.batch_latency.observe(time.perf_counter() - started)

    def _failed(self, exc: Exception, attempt: int) -> None:
        """Count and report one failed round trip; never raises."""
        # StoreError is the expected failure; anything else is a bug, logged with
        # its traceback and treated the same way: retry, never ack, never end the writer.
        if not isinstance(exc, StoreError):
            log.exception("unexpected error writing a batch")
            exc = StoreError(repr(exc))
        self._metrics.redis_errors.inc()
        self._metrics.redis_up.set(0)
        first = self.redis_ok or type(exc) is not type(self.redis_error)
        self.redis_ok = False
        self.redis_error = exc
        self.failures += 1
        if isinstance(exc, RedisFullError):
            self._metrics.redis_full.set(1)
        if isinstance(exc, RedisAuthError):
            self._metrics.redis_auth_ok.set(0)
        if first or self.failures % LOG_EVERY_FAILURES == 0:
            if isinstance(exc, RedisAuthError):
                log.error("REDIS REFUSED OUR CREDENTIALS: nothing is acknowledged until fixed",
                          error=str(exc), failures=self.failures)  # fmt: skip
            elif isinstance(exc, RedisFullError):
                log.error("REDIS IS FULL (maxmemory): devices keep their orders until it frees",
                          error=str(exc), failures=self.failures)  # fmt: skip
            else:
                log.warning("redis write failed, retrying", error=str(exc),
                            failures=self.failures, attempt=attempt)  # fmt: skip

    def _recovered(self) -> None:
        self._metrics.redis_up.set(1)
        self._metrics.redis_full.set(0)
        self._metrics.redis_auth_ok.set(1)
        self._backoff.reset()
        if not self.redis_ok:
            log.info("redis writes work again", failures=self.failures)
        self.redis_ok = True
        self.redis_error = None
        self.failures = 0

    def _settle(self, done: Done, outcome: Outcome) -> None:
        self.pending -= 1
        try:
            done(outcome)
        except Exception:
            # One message's receipt or ack failing must not stop the batch.
            log.exception("settling a message failed", outcome=outcome)

    def _shards_to_trim(self, orders: list[tuple[ValidOrder, Done]]) -> set[int]:
        if self._trim_every <= 0:
            return set()
        due: set[int] = set()
        for shard in {order.shard for order, _ in orders}:
            self._shard_batches[shard] += 1
            if self._shard_batches[shard] % self._trim_every == 0:
                due.add(shard)
        return due


def _merge_held(held: list[AppendResult], again: list[AppendResult]) -> list[AppendResult]:
    """Results of a batch written again after a replica shortfall.

    An order the first write appended answers ``duplicate`` when written again
    to the same node: its own first write left the marker, so it stays
    ``accepted``. Anything else takes the new answer, which the new WAIT covers.
    """
    return [
        AppendResult.APPENDED
        if first is AppendResult.APPENDED and now is AppendResult.DUPLICATE
        else now
        for first, now in zip(held, again, strict=True)
    ]
