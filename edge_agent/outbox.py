"""The durable outbox: async group commit over one SQLite connection.

Every coroutine that submits an order parks a future; one writer task takes
everything pending (orders plus the publisher's state updates) and commits it
as one transaction in the writer thread. While that fsync runs, the next batch
gathers, so concurrency turns into batch size instead of into more fsyncs.

The writer thread is a single-worker executor owned by the outbox, or one
passed in and shared by many outboxes (the fleet simulator runs thousands of
agents in one process). ``inline=True`` runs SQLite on the event loop itself,
which suits ``:memory:`` databases.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from types import TracebackType
from typing import Any, Self, TypeVar

import structlog

from ._clock import AgentClock
from ._records import (
    Defer,
    Due,
    Hold,
    NewOrder,
    OrderRecord,
    RetryResult,
    Sent,
    Settle,
    Stats,
    StatusQueried,
    StatusUpdate,
    Submitted,
    Update,
)
from ._store import NO_HORIZON, Store, storage_error
from .errors import AgentClosed, AgentError, OutboxFull, StorageError

__all__ = ["Due", "NewOrder", "OrderRecord", "Outbox", "Stats", "Submitted"]

_T = TypeVar("_T")
MAX_PENDING_UPDATES = 10_000
log = structlog.get_logger(__name__)


def _retrieve(task: asyncio.Future[Any]) -> None:
    # The writer may be cancelled while a shielded commit finishes; its outcome
    # then reaches nobody, and asyncio must not report it as lost.
    if not task.cancelled():
        task.exception()


def _fail(batch: list[tuple[NewOrder, asyncio.Future[Submitted]]], exc: AgentError) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)


class Outbox:
    """A SQLite outbox with group commit. Use ``async with``; not re-entrant.

    Args:
        path: database file, or ``:memory:``.
        max_rows, max_bytes: cap on unreceipted orders; past it, submit raises
            :class:`OutboxFull` and nothing is evicted.
        executor: the writer thread to use; default: a private one.
        inline: run SQLite on the event loop (for ``:memory:``).
        batch_max: most orders per transaction.
        clock: the agent clock (``_clock.py``); injectable for tests.
    """

    def __init__(
        self,
        path: str,
        *,
        max_rows: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
        executor: Executor | None = None,
        inline: bool = False,
        batch_max: int = 1024,
        clock: AgentClock | None = None,
    ) -> None:
        self.store = Store(path, max_rows=max_rows, max_bytes=max_bytes, clock=clock)
        self.clock = self.store.clock
        self.batch_max = batch_max
        self.error: StorageError | None = None
        self.on_commit: Callable[[], None] | None = None
        self._inline = inline
        self._own_executor = executor is None and not inline
        self._executor = executor
        self._orders: list[tuple[NewOrder, asyncio.Future[Submitted]]] = []
        self._updates: list[Update] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._barriers: list[asyncio.Future[None]] = []
        self._entered = False

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("Outbox is not re-entrant")
        self._entered = True
        if self._own_executor:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="outbox-writer")
        await self.try_open()
        self._writer = asyncio.create_task(self._write_loop(), name=f"outbox-writer:{self.path}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        # Finish what is pending: each waiting submitter gets its real answer.
        await self.flush()
        if self._writer is not None:
            self._writer.cancel()
            # wait() does not re-raise the child's CancelledError, but lets ours through.
            await asyncio.wait([self._writer])
        for _, future in self._orders:
            if not future.done():
                future.set_exception(AgentClosed("outbox closed before commit"))
        if self.store.is_open:
            await self._run(self.store.close)
        if self._own_executor and self._executor is not None:
            self._executor.shutdown(wait=True)
        self._entered = False

    async def writer_finished(self) -> None:
        """Wait for the writer task to end; re-raise whatever ended it (for supervision)."""
        writer = self._writer
        if writer is None:
            raise RuntimeError("the outbox is not open")
        await asyncio.wait([writer])  # our own cancellation propagates; the writer's doesn't
        if not writer.cancelled() and (exc := writer.exception()) is not None:
            raise exc
        if not self._closing:
            raise RuntimeError("the outbox writer stopped")

    @property
    def path(self) -> str:
        return self.store.path

    @property
    def available(self) -> bool:
        """True when the database is open (it may still refuse writes)."""
        return self.store.is_open

    async def try_open(self) -> bool:
        """Open the database if it is not; record, log and return failure instead of raising."""
        if self.store.is_open:
            return True
        try:
            probe = await self._run(self.store.open)
        except StorageError as exc:
            self._set_error(exc)
            return False
        if probe is not None:
            self._set_error(probe)
        else:
            self.error = None
        log.info(
            "outbox_opened",
            path=self.path,
            pending=self.store.pending_rows,
            pending_bytes=self.store.pending_bytes,
        )
        return True

    def _set_error(self, exc: StorageError) -> None:
        if self.error is None or self.error.reason != exc.reason:
            log.error("outbox_storage_error", path=self.path, reason=exc.reason, detail=exc.detail)
        self.error = exc

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        try:
            if self._inline or self._executor is None:
                return fn(*args)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, functools.partial(fn, *args))
        except sqlite3.Error as exc:
            # Reads are not translated in the store; nothing raw leaves the outbox.
            raise storage_error(exc, getattr(fn, "__name__", "outbox")) from exc

    def reserve_seq(self) -> int:
        """Take the next ``seq`` for an order about to be submitted."""
        return self.store.reserve_seq()

    async def submit(self, order: NewOrder) -> Submitted:
        """Store an encoded order durably; return once its transaction is committed.

        Raises:
            OutboxFull: at the cap; StorageError: disk full, read-only, not open;
            AgentClosed: the outbox is closing.
        """
        if self._closing:
            raise AgentClosed("the agent is shutting down")
        if not self.store.is_open:
            raise self.error or StorageError("outbox is not open", reason="unavailable")
        future: asyncio.Future[Submitted] = asyncio.get_running_loop().create_future()
        self._orders.append((order, future))
        self._wake.set()
        return await future

    def update(self, update: Update) -> None:
        """Queue a state change; it rides along with the next batch."""
        self._updates.append(update)
        self._wake.set()

    def mark_sent(self, order_id: str, retry_at_ms: int, sent_clock_ms: int) -> None:
        self.update(Sent(order_id, retry_at_ms, sent_clock_ms))

    def settle(
        self, order_id: str, state: str, reason: str | None, query_at_ms: int | None = None
    ) -> None:
        self.update(Settle(order_id, state, reason, query_at_ms))

    def defer(self, order_id: str, retry_at_ms: int, reason: str | None) -> None:
        self.update(Defer(order_id, retry_at_ms, reason))

    def hold(self, order_id: str, reason: str) -> None:
        self.update(Hold(order_id, reason))

    def set_status(
        self, order_id: str, status: str, reason: str | None, query_at_ms: int | None = None
    ) -> None:
        self.update(StatusUpdate(order_id, status, reason, query_at_ms))

    def status_queried(self, order_ids: tuple[str, ...], next_at_ms: tuple[int, ...]) -> None:
        self.update(StatusQueried(order_ids, next_at_ms))

    async def flush(self) -> None:
        """Wait until everything queued so far is committed, or its batch failed."""
        if not (self._orders or self._updates or not self._idle.is_set()):
            return
        if self._writer is None or self._writer.done():
            return
        barrier: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barriers.append(barrier)
        self._wake.set()
        await barrier

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._write_pending()
            finally:
                barriers, self._barriers = self._barriers, []
                for barrier in barriers:
                    if not barrier.done():
                        barrier.set_result(None)

    async def _write_pending(self) -> None:
        while (self._orders or self._updates) and self.store.is_open:
            batch, self._orders = self._orders[: self.batch_max], self._orders[self.batch_max :]
            updates, self._updates = self._updates, []
            self._idle.clear()
            try:
                results = await self._write(batch, updates)
            except StorageError as exc:
                self._set_error(exc)
                _fail(batch, exc)
                self._keep_updates(updates)
                return
            except Exception as exc:
                # Isolation boundary: whatever broke, every waiting submitter gets an
                # answer (the transaction was rolled back) and the writer lives on.
                log.exception("outbox_write_failed", path=self.path, orders=len(batch))
                _fail(batch, StorageError(f"write failed: {exc!r}", reason="internal_error"))
                return
            finally:
                self._idle.set()
            if self.error is not None:
                log.info("outbox_storage_recovered", path=self.path)
                self.error = None
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, AgentError):
                    future.set_exception(result)
                else:
                    future.set_result(result)
            if self.on_commit is not None and batch:
                self.on_commit()

    async def _write(
        self, batch: list[tuple[NewOrder, asyncio.Future[Submitted]]], updates: list[Update]
    ) -> list[Submitted | OutboxFull]:
        orders = [order for order, _ in batch]
        if self._inline or self._executor is None:
            return self.store.write(orders, updates)
        loop = asyncio.get_running_loop()
        write = loop.run_in_executor(self._executor, self.store.write, orders, updates)
        write.add_done_callback(_retrieve)
        # Shielded: a cancelled writer must not lose track of a commit in flight.
        return await asyncio.shield(write)

    def _keep_updates(self, updates: list[Update]) -> None:
        # State updates can be derived again (a resend brings a receipt again),
        # so after a failed write they wait for the next batch, up to a bound.
        self._updates[:0] = updates
        overflow = len(self._updates) - MAX_PENDING_UPDATES
        if overflow > 0:
            del self._updates[:overflow]
            log.warning("outbox_updates_dropped", path=self.path, dropped=overflow)

    async def due(
        self, clock_ms: int, limit: int, skip: set[str], first_sent_after: int = NO_HORIZON
    ) -> list[Due]:
        """Orders due for sending, oldest first (see :meth:`Store.due`)."""
        if not self.store.is_open or limit <= 0:
            return []
        return await self._run(self.store.due, clock_ms, limit, frozenset(skip), first_sent_after)

    async def retry_held(self, order_ids: list[str] | None, first_sent_after: int) -> RetryResult:
        """Re-queue held orders (see :meth:`Store.retry_held`).

        Raises:
            StorageError: the outbox cannot be read or written.
        """
        if not self.store.is_open:
            raise self.error or StorageError("outbox is not open", reason="unavailable")
        await self.flush()  # holds still queued for the writer must be in first
        return await self._run(self.store.retry_held, order_ids, first_sent_after)

    async def status_queries_due(
        self, clock_ms: int, limit: int, sent_after: int
    ) -> tuple[list[tuple[str, int]], int]:
        """Orders whose terminal status is overdue (see :meth:`Store.status_queries_due`)."""
        if not self.store.is_open:
            return [], 0
        await self.flush()
        return await self._guard(self.store.status_queries_due, clock_ms, limit, sent_after) or (
            [],
            0,
        )

    async def save_clock(self) -> None:
        """Persist the agent clock if its last save is older than ``SAVE_EVERY_MS``."""
        if self.store.is_open and self.clock.due_for_save(self.clock.now_ms()):
            await self._guard(self.store.save_clock)

    async def add_region(self, order_ids: list[str], region: str) -> None:
        """Commit ``region`` into these orders' geo ``attempts`` (see :meth:`Store.add_region`).

        Runs on the writer thread, between batches, and returns once committed.

        Raises:
            StorageError: not committed (or the outbox is not open).
        """
        if not self.store.is_open:
            raise self.error or StorageError("outbox is not open", reason="unavailable")
        await self._run(self.store.add_region, order_ids, region, self.clock.now_ms())

    async def regions_of(self, order_id: str) -> tuple[str, ...]:
        """An order's committed geo ``attempts`` (``()`` if none)."""
        if not self.store.is_open:
            raise self.error or StorageError("outbox is not open", reason="unavailable")
        return await self._run(self.store.regions_of, order_id)

    async def make_all_due(self) -> None:
        """Resend everything unreceipted (after a reconnect)."""
        if self.store.is_open:
            await self._guard(self.store.make_all_due)

    async def get(self, order_id: str) -> OrderRecord | None:
        if not self.store.is_open:
            raise self.error or StorageError("outbox is not open", reason="unavailable")
        return await self._run(self.store.get, order_id)

    async def page(
        self, state: str | None, before_seq: int | None, limit: int
    ) -> list[OrderRecord]:
        if not self.store.is_open:
            raise self.error or StorageError("outbox is not open", reason="unavailable")
        return await self._run(self.store.page, state, before_seq, limit)

    async def stats(self) -> Stats | None:
        return await self._run(self.store.stats) if self.store.is_open else None

    async def prune(self, settled_before_ms: int) -> int:
        """Delete receipted orders settled before the cutoff and shrink the file."""
        if not self.store.is_open:
            return 0
        deleted = await self._guard(self.store.prune, settled_before_ms)
        if deleted:
            log.info("outbox_pruned", path=self.path, deleted=deleted)
        return deleted or 0

    async def expire(self, first_sent_before: int) -> list[str]:
        """Give up on orders sent but unreceipted since before the cutoff (see Store.expire)."""
        if not self.store.is_open:
            return []
        await self.flush()  # first sends recorded by pending updates must be in first
        return await self._guard(self.store.expire, first_sent_before) or []

    async def _guard(self, fn: Callable[..., _T], *args: object) -> _T | None:
        try:
            return await self._run(fn, *args)
        except StorageError as exc:
            self._set_error(exc)
            return None


# Re-exported for callers that build updates themselves.
__all__ += ["Defer", "Hold", "OutboxFull", "RetryResult", "Sent", "Settle", "StatusUpdate"]
