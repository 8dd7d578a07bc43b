"""The worker: reads the shard streams as a consumer group and drives batches through the steps.

One worker per process (run as many processes as you like). Each loop turn
either reclaims entries that idled in a dead consumer's pending list
(``XAUTOCLAIM``) or reads new ones (``XREADGROUP``; on a Redis Cluster one
read per shard), then:

1. decodes them (undecodable → DLQ at once) and loads each order's stored state
   (one read-only script for the batch; on a cluster one per shard, every
   script call staying in one slot). An entry delivered for the first time is
   not read: its order is presumed new, and the rare one that has a record
   (a replayed dead letter, an entry appended twice) is caught by the commit's
   compare-and-set, then read and run again in the same batch;
2. sorts the batch by device and ``seq`` and runs each step on the orders that
   still need it, in memory (stock reservation is its own atomic, idempotent
   script per batch);
3. stores every order's outcome (record, history, events, released stock) in
   one script for the batch, with a compare-and-set per order;
4. hands the new statuses to the MQTT client without waiting for the broker
   (:mod:`pipeline.status`) and dead-letters; the batch's XACKs ride in the
   same pipeline as the next read (one round trip, and Redis applies them
   before the read blocks). A status that never reaches its device is
   answered again from the order's record when the device queries it.

After a batch smaller than ``batch_size``, a busy worker waits
``batch_linger_ms`` before its next read, so the next batch carries more
orders for the same round trips; a worker woken from idle never waits.

An order a step raised on stays pending; it comes back through the reclaim
path, and once delivered more than ``max_deliveries`` times it goes to the DLQ
with its last error. A SIGKILLed worker's entries come back the same way, and
since every state change is guarded in Lua, nothing is applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from schemas import DecodeError, Status, decode_stored_order
from schemas.names import PIPELINE_GROUP, stream_key
from servicekit import tracing
from servicekit.backoff import Backoff
from servicekit.clock import now_ms
from servicekit.redis_clients import error_code, text

from ._calls import AnyRedis, Rider
from ._lua import Scripts
from ._tracing import status_spans, step_spans
from .config import PipelineConfig
from .dlq import MAX_DELIVERIES_REASON, DeadLetter, dead_letter
from .metrics import WorkerMetrics
from .names import CATALOG_META_KEY, order_key
from .records import (
    PUBLISHED_STATUSES,
    OrderContext,
    StreamEntry,
    commit,
    forget_expired,
    load,
    order_histories,
)
from .status import StatusSender
from .steps import Step
from .stock import settle_transfers

log = structlog.get_logger(__name__)
BACKOFF_BASE_S = 0.01
LOG_EVERY_FAILURES = 1000  # during a long outage, one warning per this many failed tries
CLEANUP_EVERY_S = 60.0


@dataclass(slots=True)
class Settled:
    """A batch whose outcomes are stored: what is left to publish, dead-letter and ack."""

    ctxs: list[OrderContext]
    letters: list[DeadLetter]
    statuses: list[tuple[str, Status]]


def default_consumer_name() -> str:
    """``{hostname}-{pid}``: unique per process, so a restart is a new consumer."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    """One consumer of the ``pipeline`` group over all shard streams."""

    def __init__(
        self,
        client: AnyRedis,
        publisher: StatusSender,
        chain: Sequence[Step],
        config: PipelineConfig,
        metrics: WorkerMetrics,
        *,
        scripts: Scripts | None = None,
    ) -> None:
        self.redis = client
        self.publisher = publisher
        self.chain = list(chain)
        self.config = config
        self.metrics = metrics
        self.scripts = scripts or Scripts()
        self.consumer = config.consumer or default_consumer_name()
        self.shards = config.shards
        self.streams = [stream_key(shard) for shard in range(config.shards)]
        self.batches = 0  # finished batches, for tests and logs
        self.lingers = 0  # waits before a read (batch_linger_ms), for tests
        self.retention_ms = round(config.retention_days * 86_400_000)
        self.failures = 0  # consecutive failed turns (Redis unreachable, refusing, full)
        self.backoff = Backoff(min(BACKOFF_BASE_S, config.backoff_max_s), config.backoff_max_s)
        # Steps whose reads travel with the batch's load (one round trip for both).
        self._riders = [step for step in self.chain if isinstance(step, Rider)]
        self._task: asyncio.Task[Any] | None = None  # the task running run()
        self._reading = False  # blocked in the idle read: a stop may cut it short
        self._read_cut = False
        # Entries of finished batches not yet XACKed, per stream: they ride with the next read.
        self._unacked: defaultdict[str, list[str]] = defaultdict(list)

    async def setup(self) -> None:
        """Create the group on every shard stream (from id 0, MKSTREAM) and load the scripts."""
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, PIPELINE_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        await self.scripts.load(self.redis)
        stock_shards = await self.redis.hget(CATALOG_META_KEY, "shards")
        if stock_shards is not None and int(stock_shards) != self.shards:
            # Stock parts of shards this deployment does not have are never reached.
            log.error("catalog_shards_mismatch", catalog_shards=int(stock_shards),
                      shards=self.shards, fix="catalog load --shards N")  # fmt: skip

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set; the batch in hand is always finished and acked.

        Redis errors do not end the worker, however long they last: it backs
        off (:class:`servicekit.backoff.Backoff`, capped at ``backoff_max_s`` and
        reset once Redis answers again, so it is back within the cap after any
        outage) and carries on; whatever it held stays pending and is reclaimed.
        The wait ends early on ``stop``.
        """
        self._task = asyncio.current_task()
        waker = asyncio.create_task(self._end_read_on_stop(stop), name="end-read-on-stop")
        try:
            await self._run_until(stop)
        finally:
            waker.cancel()
        log.info("worker_stopped", consumer=self.consumer, batches=self.batches)

    async def _end_read_on_stop(self, stop: asyncio.Event) -> None:
        """On ``stop``, cancel a read blocked on empty streams (it may block for ``block_ms``).

        Only the idle read is cut short: a batch in hand always finishes.
        """
        await stop.wait()
        if self._reading and self._task is not None:
            self._read_cut = True
            self._task.cancel()

    async def _run_until(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._run(stop)
            except (RedisError, RedisClusterException, OSError) as exc:
                self.failures += 1
                delay_s = self.backoff.next_delay()
                if self.failures == 1 or self.failures % LOG_EVERY_FAILURES == 0:
                    log.warning("redis_error", error=repr(exc), code=error_code(exc),
                                failures=self.failures, retry_in_s=round(delay_s, 3))  # fmt: skip
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay_s):
                        await stop.wait()
            else:
                break

    async def _run(self, stop: asyncio.Event) -> None:
        await self.setup()
        log.info("worker_started", consumer=self.consumer, shards=len(self.streams),
                 steps=[step.name for step in self.chain])  # fmt: skip
        claim_every_s = self.config.claim_every_ms / 1000
        linger_s = self.config.batch_linger_ms / 1000
        next_claim = next_cleanup = 0.0
        idle = True  # the last loop turn found nothing: the next order is answered at once
        # Batches finish one after the other, so statuses go out in order; a
        # batch's XACKs go out with the next read or reclaim (see _take_acks).
        try:
            while not stop.is_set():
                if time.monotonic() >= next_cleanup:
                    next_cleanup = time.monotonic() + CLEANUP_EVERY_S
                    await self.forget_dead_consumers()
                    await self.forget_expired_orders()
                    await settle_transfers(self.redis, self.scripts, shards=self.shards)
                entries: list[StreamEntry] = []
                busy = False
                if time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + claim_every_s
                    entries = await self.reclaim()
                if not entries:
                    read_at = time.monotonic()
                    entries = await self._read_unless(stop)
                    busy = not idle and time.monotonic() - read_at < linger_s
                idle = not entries
                if not entries:
                    self._worked()
                    continue
                settled = await self.settle(entries)
                self._worked()
                await self.finish(settled)
                if busy and len(entries) < self.config.batch_size:
                    await self._linger(linger_s, stop)
        finally:
            # Stopping (or failing): the last batch's acks must not wait for a read
            # that never comes. If this flush fails they are dropped (see _acks_riding).
            with contextlib.suppress(RedisError, RedisClusterException, OSError):
                await self.flush_acks()

    async def _linger(self, linger_s: float, stop: asyncio.Event) -> None:
        """Let orders gather before the next read, after a small batch of a busy worker.

        Busy: the read that followed a batch found orders waiting, or got one
        within the linger. A worker woken from idle (its last read came back
        empty, or this one blocked for longer) reads again at once, so a quiet
        fleet's orders wait for nothing. The statuses of the batch just finished
        are out already; its acks wait for the next read.
        """
        self.lingers += 1
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(linger_s):
                await stop.wait()

    async def _read_unless(self, stop: asyncio.Event) -> list[StreamEntry]:
        """:meth:`read`, cut short by ``stop`` (see :meth:`_end_read_on_stop`).

        A read cut short may have taken entries (Redis answered as the cancel
        came): they stay pending with this consumer and are reclaimed after
        ``claim_idle_ms``, as a killed worker's are.
        """
        self._reading = True
        try:
            if stop.is_set():  # checked with the flag up: no await in between
                return []
            return await self.read()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._read_cut or task is None or task.uncancel() > 0:
                raise  # someone else's cancel (the grace period's) too
            return []
        finally:
            self._reading = False
            self._read_cut = False

    def _worked(self) -> None:
        """A loop turn went through: the next failure starts backing off from scratch."""
        if self.failures:
            log.info("redis_ok_again", failures=self.failures)
            self.failures = 0
        self.backoff.reset()

    async def forget_expired_orders(self) -> int:
        """Trim the device and order-id indexes of orders whose retention ended."""
        total = 0
        while (done := await forget_expired(self.redis, self.scripts, shards=self.shards)) > 0:
            total += done
        if total:
            log.info("forgot_expired_orders", orders=total)
        return total

    async def forget_dead_consumers(self) -> None:
        """XGROUP DELCONSUMER consumers that hold nothing and were idle for long.

        Every worker process is a new consumer (host-pid), so restarts would
        otherwise pile up names in the group forever.
        """
        idle_ms = self.config.dead_consumer_idle_ms
        for stream in self.streams:
            rows: Any = await self.redis.xinfo_consumers(stream, PIPELINE_GROUP)
            for row in rows:
                name = text(row["name"])
                if (
                    name != self.consumer
                    and int(row["pending"]) == 0
                    and int(row["idle"]) > idle_ms
                ):
                    await self.redis.xgroup_delconsumer(stream, PIPELINE_GROUP, name)
                    log.info("forgot_dead_consumer", stream=stream, consumer=name)

    async def read(self) -> list[StreamEntry]:
        """XREADGROUP new entries from every shard (blocks up to ``block_ms``).

        On a Redis Cluster one command cannot read streams of several slots:
        each shard is read on its own (all at once), and while every shard is
        empty the worker polls again after ``idle_poll_ms``.
        """
        if isinstance(self.redis, RedisCluster):
            await self.flush_acks()
            return await self._read_cluster(self.redis)
        acks = self._take_acks()
        with self._acks_riding(acks):
            async with self.redis.pipeline(transaction=False) as pipe:
                self._queue_acks(pipe, acks)
                pipe.xreadgroup(
                    PIPELINE_GROUP,
                    self.consumer,
                    dict.fromkeys(self.streams, ">"),
                    count=self.config.batch_size,
                    block=self.config.block_ms,
                )
                replies: list[Any] = await pipe.execute()
        return _entries(replies[-1])

    async def _read_cluster(self, client: RedisCluster) -> list[StreamEntry]:
        async def one(stream: str) -> Any:
            # Sent to the slot's node directly: redis-py would otherwise ask the
            # cluster for XREADGROUP's keys (COMMAND GETKEYS) on every call.
            return await client.execute_command(
                "XREADGROUP", "GROUP", PIPELINE_GROUP, self.consumer,
                "COUNT", self.config.batch_size, "STREAMS", stream, ">",
                target_nodes=client.get_node_from_key(stream),
            )  # fmt: skip

        replies = await asyncio.gather(*(one(stream) for stream in self.streams))
        entries = [e for reply in replies for e in _entries(reply)]
        if not entries:
            await asyncio.sleep(self.config.idle_poll_ms / 1000)
        return entries

    async def reclaim(self) -> list[StreamEntry]:
        """XAUTOCLAIM entries idle past ``claim_idle_ms``; dead-letter the over-delivered."""
        acks = {} if isinstance(self.redis, RedisCluster) else self._take_acks()
        with self._acks_riding(acks):
            async with self.redis.pipeline(transaction=False) as pipe:
                self._queue_acks(pipe, acks)
                for stream in self.streams:
                    pipe.xautoclaim(
                        stream, PIPELINE_GROUP, self.consumer, self.config.claim_idle_ms,
                        start_id="0-0", count=self.config.batch_size,
                    )  # fmt: skip
                replies = (await pipe.execute())[len(acks) :]
        claimed: dict[str, list[tuple[str, dict[str, bytes]]]] = {}
        for stream, reply in zip(self.streams, replies, strict=True):
            rows = [(text(i), {text(k): v for k, v in f.items()}) for i, f in reply[1] if f]
            if rows:
                claimed[stream] = rows
            if len(reply) > 2 and reply[2]:
                log.warning("reclaimed_entries_deleted", stream=stream, ids=len(reply[2]))
        if not claimed:
            return []
        deliveries = await self._deliveries(claimed)
        entries = [
            StreamEntry(stream, entry_id, fields, deliveries.get(entry_id, 2))
            for stream, rows in claimed.items()
            for entry_id, fields in rows
        ]
        self.metrics.reclaimed.inc(len(entries))
        over = [e for e in entries if e.deliveries > self.config.max_deliveries]
        if over:
            await self._dead_letter_over_delivered(over)
        log.info("reclaimed", entries=len(entries), dead_lettered=len(over))
        return [e for e in entries if e.deliveries <= self.config.max_deliveries]

    async def _deliveries(
        self, claimed: dict[str, list[tuple[str, dict[str, bytes]]]]
    ) -> dict[str, int]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, rows in claimed.items():
                pipe.xpending_range(
                    stream, PIPELINE_GROUP, min=rows[0][0], max=rows[-1][0],
                    count=len(rows) * 10 + 100, consumername=self.consumer,
                )  # fmt: skip
            replies = await pipe.execute()
        return {
            text(row["message_id"]): int(row["times_delivered"])
            for reply in replies
            for row in reply
        }

    async def _dead_letter_over_delivered(self, entries: list[StreamEntry]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry in entries:
                key = order_key(
                    text(entry.fields.get("device_id", b"")),
                    text(entry.fields.get("order_id", b"")),
                    self.shards,
                )
                pipe.hget(key, "last_error")
            errors = await pipe.execute()
        await dead_letter(
            self.redis,
            self.scripts,
            [
                DeadLetter(entry, MAX_DELIVERIES_REASON, text(error) if error else "unknown")
                for entry, error in zip(entries, errors, strict=True)
            ],
        )
        for entry in entries:
            log.error(
                "dead_lettered",
                stream=entry.stream,
                entry_id=entry.entry_id,
                order_id=text(entry.fields.get("order_id", b"")),
                deliveries=entry.deliveries,
            )
        self.metrics.dead_lettered.labels(reason=MAX_DELIVERIES_REASON).inc(len(entries))
        self.metrics.processed.labels(outcome="dead_lettered").inc(len(entries))

    async def process(self, entries: Sequence[StreamEntry]) -> None:
        """Drive one batch through the chain, store the outcomes, send statuses, then ack."""
        await self.finish(await self.settle(entries))
        await self.flush_acks()

    async def settle(self, entries: Sequence[StreamEntry]) -> Settled:
        """Decode, load, run the steps in memory and store every order's outcome."""
        letters: list[DeadLetter] = []
        decoded = []
        for entry in entries:
            try:
                order = decode_stored_order(
                    entry.payload, topic_device_id=text(entry.fields.get("device_id", b""))
                )
            except DecodeError as exc:
                letters.append(DeadLetter(entry, exc.reason, exc.detail))
            else:
                decoded.append((entry, order))
        ctxs: list[OrderContext] = []
        if decoded:
            ctxs = await load(self.redis, self.scripts, decoded, shards=self.shards,
                              riders=self._riders, presume_new=True)  # fmt: skip
        statuses = await self._drive(ctxs)
        moved = [c for c in ctxs if c.presumed and c.stale]
        if moved:
            # Presumed new, but their records were there (a dead letter replayed, an
            # entry appended twice): nothing of theirs was stored. Read them, run again.
            again = await load(self.redis, self.scripts, [(c.entry, c.order) for c in moved],
                               shards=self.shards, riders=self._riders)  # fmt: skip
            statuses += await self._drive(again)
            ctxs = [c for c in ctxs if not (c.presumed and c.stale)] + again
        return Settled(ctxs, letters, statuses)

    async def _drive(self, ctxs: list[OrderContext]) -> list[tuple[str, Status]]:
        """Run the steps on loaded contexts and store the outcomes; the statuses to send."""
        ctxs.sort(key=lambda c: (c.order.device_id, c.order.seq))
        # A redelivered entry's earlier statuses may have died with the consumer
        # that stored them (before they reached the broker): send them again.
        statuses = await self._replay_statuses([c for c in ctxs if c.entry.deliveries > 1])
        for step in self.chain:
            live = [c for c in ctxs if c.live and step.name not in c.done]
            if not live:
                continue
            started = time.perf_counter()
            with tracing.per_order_spans(f"pipeline {step.name}", step_spans(live)):
                await self._run_step(step, live)
            for ctx in live:
                ctx.settle(step.name)
            self.metrics.step_seconds.labels(step=step.name).observe(time.perf_counter() - started)
        started = time.perf_counter()
        stored = await commit(
            self.redis, self.scripts, ctxs, shards=self.shards, retention_ms=self.retention_ms
        )
        self.metrics.step_seconds.labels(step="commit").observe(time.perf_counter() - started)
        at = now_ms()
        return statuses + [
            self._message(ctx, status, reason, at)
            for ctx in stored
            for status, _step, reason in ctx.changes
            if status in PUBLISHED_STATUSES
        ]

    async def finish(self, settled: Settled) -> None:
        """Send the batch's statuses (never waiting on the broker), dead-letter, queue the acks.

        The acks leave with the next read or reclaim, or :meth:`flush_acks`.
        """
        spans = status_spans(settled.ctxs, settled.statuses)
        with tracing.per_order_spans("status publish", spans, kind="PRODUCER"):
            self.publisher.send(settled.statuses)
        await dead_letter(self.redis, self.scripts, settled.letters)
        self._ack([c for c in settled.ctxs if c.error is None and not c.stale])
        for letter in settled.letters:
            log.error("dead_lettered", reason=letter.reason, error=letter.error,
                      stream=letter.entry.stream, entry_id=letter.entry.entry_id)  # fmt: skip
            self.metrics.dead_lettered.labels(reason=letter.reason).inc()
        self.batches += 1

    async def _run_step(self, step: Step, live: list[OrderContext]) -> None:
        try:
            await step.run(live)
        except Exception:
            for ctx in live:
                ctx.proposed = None
        else:
            return
        for ctx in live:
            try:
                await step.run([ctx])
            except Exception as exc:
                ctx.proposed = None
                ctx.error = f"{step.name}: {exc!r}"[:1000]
                self.metrics.step_errors.labels(step=step.name).inc()
                log.warning("step_failed", step=step.name, order_id=ctx.order.order_id,
                            device_id=ctx.order.device_id, deliveries=ctx.entry.deliveries,
                            error=repr(exc))  # fmt: skip

    def _ack(self, ctxs: list[OrderContext]) -> None:
        if not ctxs:
            return
        outcomes: Counter[str] = Counter()
        for ctx in ctxs:
            self._unacked[ctx.entry.stream].append(ctx.entry.entry_id)
            outcomes[ctx.status] += 1
        for outcome, count in outcomes.items():
            self.metrics.processed.labels(outcome=outcome).inc(count)

    def _take_acks(self) -> dict[str, list[str]]:
        """The queued acks, handed to one round trip (see :meth:`_acks_riding`)."""
        acks, self._unacked = self._unacked, defaultdict(list)
        return acks

    @contextlib.contextmanager
    def _acks_riding(self, acks: dict[str, list[str]]) -> Iterator[None]:
        """Around the round trip that carries ``acks``: what happens to them if it fails.

        Cancelled (a stop cut the idle read short): they go back in the queue for
        the flush on the way out; XACK of an id acked before is a no-op. Failed:
        they are dropped. The error may be the node's (a demoted master answers
        READONLY, a frozen one times out), and the next round trip may reach another
        node: there an XACK would remove an entry whose outcome was stored only on
        the old one, and the order would never be done. Dropped, the entries stay
        pending where they are, are reclaimed, and an order already stored is
        recognised by its record and acked without doing anything again.
        """
        try:
            yield
        except asyncio.CancelledError:
            for stream, ids in acks.items():
                self._unacked[stream].extend(ids)
            raise
        except BaseException:
            if acks:
                log.warning("acks_dropped", entries=sum(len(ids) for ids in acks.values()))
            raise

    @staticmethod
    def _queue_acks(pipe: Any, acks: dict[str, list[str]]) -> None:
        """One XACK per stream at the head of ``pipe`` (one reply each)."""
        for stream, ids in acks.items():
            pipe.xack(stream, PIPELINE_GROUP, *ids)

    async def flush_acks(self) -> None:
        """XACK what finished batches left queued, now (stop, a cluster read, tests)."""
        acks = self._take_acks()
        if not acks:
            return
        with self._acks_riding(acks):
            # Shielded: once the effects are stored, the ack must not be lost to a cancel.
            await asyncio.shield(self._xack(acks))

    async def _xack(self, by_stream: dict[str, list[str]]) -> Any:
        async with self.redis.pipeline(transaction=False) as pipe:
            self._queue_acks(pipe, by_stream)
            return await pipe.execute()

    async def _replay_statuses(self, ctxs: list[OrderContext]) -> list[tuple[str, Status]]:
        if not ctxs:
            return []
        refs = [(ctx.order.device_id, ctx.order.order_id) for ctx in ctxs]
        histories = await order_histories(self.redis, refs, shards=self.shards)
        return [
            self._message(ctx, change["status"], change["reason"], change["at"])
            for ctx, history in zip(ctxs, histories, strict=True)
            for change in history
            if change["status"] in PUBLISHED_STATUSES
        ]

    @staticmethod
    def _message(ctx: OrderContext, status: str, reason: str, at: int) -> tuple[str, Status]:
        return ctx.order.device_id, Status(
            v=1, order_id=ctx.order.order_id, status=status,  # type: ignore[arg-type]
            reason=reason or None, at=at,
        )  # fmt: skip


def _entries(reply: Any) -> list[StreamEntry]:
    """An XREADGROUP reply as stream entries."""
    return [
        # Keys come as bytes (the client does not decode responses).
        StreamEntry(stream.decode(), entry_id.decode(), {k.decode(): v for k, v in fields.items()})
        for stream, rows in reply or []
        for entry_id, fields in rows
    ]
