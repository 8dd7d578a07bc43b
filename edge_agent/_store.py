"""The outbox's SQLite layer: synchronous, owned by exactly one thread at a time.

:class:`Store` holds the one ``sqlite3`` connection. :class:`edge_agent.outbox.Outbox`
calls it from a single writer thread (or inline, for an in-memory database),
handing it whole batches so that many orders share one transaction and one
fsync (group commit).

Durability settings, and why:

* ``journal_mode=WAL`` + ``synchronous=FULL``: a commit is on disk when
  ``COMMIT`` returns, so a 202 survives power loss.
* ``locking_mode=EXCLUSIVE`` before the first access: SQLite then keeps the
  WAL index on the heap instead of a ``-shm`` mmap. A process that opens a
  WAL database on a full disk would otherwise die of SIGBUS touching the map;
  it also stops a second agent from opening the same queue.
* ``auto_vacuum=INCREMENTAL``: pruned pages go back to the file system.

Order states: ``queued`` → ``sent`` → ``accepted`` | ``rejected`` (settled by
a receipt), or ``held`` (refused by the broker with a definitive PUBACK code:
unsettled, never sent, never pruned, until ``retry`` re-queues it). Retry
times and the dedup-horizon check use the agent clock (``_clock.py``); the
``*_ms`` timestamps shown to people are wall clock.
"""

from __future__ import annotations

import contextlib
import sqlite3
from typing import Any, ClassVar, Final, Literal

from schemas.errors import Reason
from servicekit.clock import now_ms

from ._clock import AgentClock
from ._migrations import MIGRATIONS, SCHEMA_VERSION
from ._records import (
    TERMINAL_STATUSES,
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
from .errors import OutboxFull, StorageError

AUTHORITY_UNREACHABLE: Final = Reason.AUTHORITY_UNREACHABLE
UNKNOWN_REGION: Final = Reason.UNKNOWN_REGION

# "No order is past the horizon": before any agent-clock reading.
NO_HORIZON: Final = -(2**62)

# Primary result codes (the low byte of the extended code).
_SQLITE_CODES: Final = {
    5: "locked",  # SQLITE_BUSY: another process holds the exclusive lock
    6: "locked",
    8: "read_only",
    10: "io_error",
    11: "corrupt",
    13: "disk_full",
    14: "unavailable",  # SQLITE_CANTOPEN
    26: "corrupt",  # SQLITE_NOTADB
}


def _check_version(version: int) -> None:
    if version > SCHEMA_VERSION:
        raise StorageError(
            f"database schema v{version} is newer than this agent (v{SCHEMA_VERSION})",
            reason="schema_too_new",
        )


def storage_error(exc: sqlite3.Error, action: str) -> StorageError:
    """Translate a sqlite3 error into a :class:`StorageError` with a reason code."""
    code = getattr(exc, "sqlite_errorcode", None)
    reason = _SQLITE_CODES.get(code & 0xFF, "io_error") if isinstance(code, int) else "io_error"
    err = StorageError(f"{action}: {exc}", reason=reason)
    err.__cause__ = exc
    return err


_INSERT: Final = (
    "INSERT INTO orders (seq, order_id, payload, size, state, created_ms, updated_ms, "
    "traceparent) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?) ON CONFLICT (order_id) DO NOTHING"
)
_COLUMNS: Final = (
    "order_id, seq, state, status, reason, attempts, created_ms, updated_ms, settled_ms, regions"
)


def _order_record(row: tuple[Any, ...]) -> OrderRecord:
    order_id, seq, state, status, reason, sends, created, updated, settled, regions = row
    return OrderRecord(
        order_id,
        seq,
        state,
        status,
        reason,
        sends,
        created,
        updated,
        settled,
        tuple(regions.split(",")) if regions else (),
    )


Synchronous = Literal["FULL", "NORMAL", "OFF"]


class Store:
    """One SQLite outbox database. Not thread-safe: one caller at a time."""

    # Always FULL in the agent. Only the power-cut test's negative control lowers it
    # (tests/powercut/unsynced_agent.py), to prove the cuts catch a commit left unsynced.
    synchronous: ClassVar[Synchronous] = "FULL"

    def __init__(
        self, path: str, *, max_rows: int, max_bytes: int, clock: AgentClock | None = None
    ) -> None:
        self.path = path
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.clock = clock or AgentClock()
        self.pending_rows = 0
        self.pending_bytes = 0
        self.held_rows = 0
        self._next_seq = 0
        self._conn: sqlite3.Connection | None = None

    @property
    def is_open(self) -> bool:
        """True once the database is open and migrated."""
        return self._conn is not None

    def open(self) -> StorageError | None:
        """Open, migrate and probe the database.

        Returns the error of a write probe (say, a full disk) while keeping the
        database open for reading and sending.

        Raises:
            StorageError: the database cannot be opened or migrated at all.
        """
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise storage_error(exc, f"open {self.path}") from exc
        try:
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            if self.path == ":memory:":
                # Thousands of simulated devices each hold one: small pages take a
                # third of the memory of the default 4 KiB ones.
                conn.execute("PRAGMA page_size=1024")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute("PRAGMA temp_store=MEMORY")
            _check_version(version)
            for number in range(version + 1, SCHEMA_VERSION + 1):
                conn.executescript(
                    f"BEGIN IMMEDIATE; {MIGRATIONS[number - 1]}; "
                    f"PRAGMA user_version={number}; COMMIT;"
                )
            if version < 2:
                # A new agent clock starts at the wall time (see _clock.py).
                wall = self.clock.wall_ms()
                conn.execute(
                    "UPDATE meta SET value = ? WHERE key IN ('clock_ms', 'clock_wall_ms')", (wall,)
                )
            self._conn = conn
            self._load_counters()
        except sqlite3.Error as exc:
            conn.close()
            self._conn = None
            raise storage_error(exc, f"open {self.path}") from exc
        except StorageError:
            conn.close()
            raise
        try:
            conn.execute("UPDATE meta SET value = ? WHERE key = 'last_open_ms'", (now_ms(),))
        except sqlite3.Error as exc:
            return storage_error(exc, "write probe")
        return None

    def close(self) -> None:
        """Checkpoint (best effort) and close."""
        if self._conn is None:
            return
        # A full disk may refuse the checkpoint; the WAL is replayed at the next open.
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()
        self._conn = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageError(f"{self.path} is not open", reason="unavailable")
        return self._conn

    def _load_counters(self) -> None:
        conn = self.conn
        rows, size = conn.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM orders WHERE settled_ms IS NULL"
        ).fetchone()
        self.pending_rows, self.pending_bytes = rows, size
        self.held_rows = conn.execute(
            "SELECT count(*) FROM orders WHERE settled_ms IS NULL AND state = 'held'"
        ).fetchone()[0]
        saved = dict(
            conn.execute("SELECT key, value FROM meta WHERE key IN ('clock_ms', 'clock_wall_ms')")
        )
        self.clock.resume(saved["clock_ms"], saved["clock_wall_ms"])
        # meta.next_seq only moves when prune deletes rows; otherwise the table knows.
        self._next_seq = conn.execute(
            "SELECT max((SELECT value FROM meta WHERE key = 'next_seq'), "
            "(SELECT coalesce(max(seq), -1) + 1 FROM orders))"
        ).fetchone()[0]

    def reserve_seq(self) -> int:
        """The next per-device ``seq``, taken in submit order (on the event loop).

        An order that is refused or never committed leaves a gap; ``seq``
        only has to increase. A restarted agent never reuses a committed
        ``seq``: it continues after the largest stored one, or after
        ``meta.next_seq``, which prune sets before deleting rows.
        """
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def write(self, orders: list[NewOrder], updates: list[Update]) -> list[Submitted | OutboxFull]:
        """Insert ``orders`` and apply ``updates`` in one transaction (one fsync).

        An ``order_id`` already stored is the idempotency key: it answers with
        the stored order instead.

        Raises:
            StorageError: the transaction failed and was rolled back; nothing
                of this batch is stored.
        """
        conn = self.conn
        stamp = now_ms()
        rows, size = self.pending_rows, self.pending_bytes
        batch_bytes = sum(len(order.payload) for order in orders)
        try:
            conn.execute("BEGIN IMMEDIATE")
            if rows + len(orders) <= self.max_rows and size + batch_bytes <= self.max_bytes:
                results, rows, size = self._insert_many(orders, stamp, rows, size)
            else:
                results, rows, size = self._insert_each(orders, stamp, rows, size)
            for update in updates:
                rows, size = self._apply(update, stamp, rows, size)
            clock_now = self.clock.now_ms()
            if self.clock.due_for_save(clock_now):
                self._save_clock(clock_now)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise storage_error(exc, "write batch") from exc
        except BaseException:
            self._rollback()
            raise
        self.pending_rows, self.pending_bytes = rows, size
        return results

    def _insert_many(
        self, orders: list[NewOrder], stamp: int, rows: int, size: int
    ) -> tuple[list[Submitted | OutboxFull], int, int]:
        # Fast path: the whole batch fits under the cap, so one executemany.
        cur = self.conn.executemany(
            _INSERT,
            [
                (o.seq, o.order_id, o.payload, len(o.payload), stamp, stamp, o.traceparent)
                for o in orders
            ],
        )
        if cur.rowcount == len(orders):
            added = sum(len(o.payload) for o in orders)
            done = [Submitted(o.order_id, o.seq, "queued") for o in orders]
            return list[Submitted | OutboxFull](done), rows + len(orders), size + added
        # Some ids were known: a row holding our own seq is ours, any other is the first answer.
        results: list[Submitted | OutboxFull] = []
        for order in orders:
            existing = self._existing(order.order_id)
            assert existing is not None  # inserted now or before
            if existing.seq == order.seq:
                results.append(Submitted(order.order_id, order.seq, "queued"))
                rows, size = rows + 1, size + len(order.payload)
            else:
                results.append(existing)
        return results, rows, size

    def _insert_each(
        self, orders: list[NewOrder], stamp: int, rows: int, size: int
    ) -> tuple[list[Submitted | OutboxFull], int, int]:
        # Near the cap: decide order by order, so that one order too many is refused alone.
        conn = self.conn
        results: list[Submitted | OutboxFull] = []
        for o in orders:
            if rows + 1 > self.max_rows or size + len(o.payload) > self.max_bytes:
                results.append(self._existing(o.order_id) or self._full(rows, size))
                continue
            cur = conn.execute(
                _INSERT,
                (o.seq, o.order_id, o.payload, len(o.payload), stamp, stamp, o.traceparent),
            )
            if cur.rowcount == 1:
                results.append(Submitted(o.order_id, o.seq, "queued"))
                rows, size = rows + 1, size + len(o.payload)
            else:
                existing = self._existing(o.order_id)
                assert existing is not None  # the conflict says it exists
                results.append(existing)
        return results, rows, size

    def _save_clock(self, clock_now: int) -> None:
        self.conn.executemany(
            "UPDATE meta SET value = ? WHERE key = ?",
            ((clock_now, "clock_ms"), (self.clock.wall_ms(), "clock_wall_ms")),
        )
        self.clock.saved_ms = clock_now

    def save_clock(self) -> None:
        """Persist the agent clock now (autocommit; also done by write batches)."""
        try:
            self._save_clock(self.clock.now_ms())
        except sqlite3.Error as exc:
            raise storage_error(exc, "save clock") from exc

    def _rollback(self) -> None:
        conn = self.conn
        if conn.in_transaction:
            # SQLite may have rolled back already (SQLITE_FULL can).
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    def _full(self, rows: int, size: int) -> OutboxFull:
        return OutboxFull(
            f"outbox holds {rows} unreceipted orders / {size} bytes "
            f"(cap {self.max_rows} / {self.max_bytes})"
        )

    def _existing(self, order_id: str) -> Submitted | None:
        row = self.conn.execute(
            "SELECT seq, state FROM orders WHERE order_id = ?", (order_id,)
        ).fetchone()
        return None if row is None else Submitted(order_id, row[0], row[1], duplicate=True)

    def _apply(self, update: Update, stamp: int, rows: int, size: int) -> tuple[int, int]:
        conn = self.conn
        match update:
            case Sent(order_id, retry_at, sent_clock):
                conn.execute(
                    "UPDATE orders SET state = 'sent', attempts = attempts + 1, "
                    "next_retry_ms = ?, updated_ms = ?, "
                    "first_sent_clock_ms = coalesce(first_sent_clock_ms, ?) "
                    "WHERE order_id = ? AND settled_ms IS NULL AND state != 'held'",
                    (retry_at, stamp, sent_clock, order_id),
                )
            case Defer(order_id, retry_at, reason):
                conn.execute(
                    "UPDATE orders SET next_retry_ms = ?, reason = ?, updated_ms = ? "
                    "WHERE order_id = ? AND settled_ms IS NULL AND state != 'held'",
                    (retry_at, reason, stamp, order_id),
                )
            case Hold(order_id, reason):
                held = conn.execute(
                    "UPDATE orders SET state = 'held', reason = ?, updated_ms = ? "
                    "WHERE order_id = ? AND settled_ms IS NULL AND state != 'held' "
                    "RETURNING 1",
                    (reason, stamp, order_id),
                ).fetchone()
                self.held_rows += held is not None
            case Settle(order_id, state, reason, query_at):
                return self._settle(order_id, state, reason, stamp, query_at, rows=rows, size=size)
            case StatusUpdate(order_id, status, reason, query_at):
                conn.execute(
                    "UPDATE orders SET status = ?, reason = coalesce(?, reason), updated_ms = ?, "
                    "status_query_ms = CASE WHEN ? IS NULL THEN NULL "
                    "ELSE coalesce(status_query_ms, ?) END "
                    "WHERE order_id = ?",
                    (status, reason, stamp, query_at, query_at, order_id),
                )
                # A status means the cloud has the order, even if its receipt got lost.
                return self._settle(
                    order_id, "accepted", None, stamp, query_at, rows=rows, size=size
                )
            case StatusQueried(order_ids, next_at):
                conn.executemany(
                    "UPDATE orders SET status_query_ms = ?, status_queries = status_queries + 1 "
                    "WHERE order_id = ? AND status_query_ms IS NOT NULL",
                    zip(next_at, order_ids, strict=True),
                )
        return rows, size

    def _settle(
        self,
        order_id: str,
        state: str,
        reason: str | None,
        stamp: int,
        query_at: int | None,
        *,
        rows: int,
        size: int,
    ) -> tuple[int, int]:
        before = self.conn.execute(
            "SELECT size, state, status FROM orders WHERE order_id = ? AND settled_ms IS NULL",
            (order_id,),
        ).fetchone()
        if before is None:
            return rows, size
        _, was, status = before
        # A terminal status heard before the receipt leaves nothing to ask for.
        if status is not None and status in TERMINAL_STATUSES:
            query_at = None
        self.conn.execute(
            "UPDATE orders SET state = ?, reason = ?, settled_ms = ?, updated_ms = ?, "
            "status_query_ms = CASE WHEN ? = 'accepted' THEN coalesce(status_query_ms, ?) END "
            "WHERE order_id = ?",
            (state, reason, stamp, stamp, state, query_at, order_id),
        )
        self.held_rows -= was == "held"
        return rows - 1, size - before[0]

    def due(
        self,
        now: int,
        limit: int,
        skip: frozenset[str] | set[str],
        first_sent_after: int = NO_HORIZON,
    ) -> list[Due]:
        """Up to ``limit`` unreceipted orders due by ``now``, oldest first, not in ``skip``.

        Never an order first sent at or before ``first_sent_after``: past the
        dedup horizon a resend could be appended twice (agent clock, all three).
        """
        out: list[Due] = []
        cur = self.conn.execute(
            "SELECT seq, order_id, payload, attempts, regions, traceparent FROM orders "
            "WHERE settled_ms IS NULL AND next_retry_ms <= ? AND state != 'held' "
            "AND (first_sent_clock_ms IS NULL OR first_sent_clock_ms > ?) ORDER BY seq",
            (now, first_sent_after),
        )
        for seq, order_id, payload, sends, regions, traceparent in cur:
            if order_id not in skip:
                out.append(Due(seq, order_id, payload, sends, regions, traceparent))
                if len(out) >= limit:
                    break
        cur.close()
        return out

    def add_region(self, order_ids: list[str], region: str, clock_ms: int) -> None:
        """Append ``region`` to each order's ``regions`` (its geo ``attempts``) unless there.

        One transaction, committed (``synchronous=FULL``) before it returns: the
        caller publishes to ``region`` only after this. Entries are never
        removed. Region names are ``[a-z0-9-]``, so they carry no LIKE wildcard.
        It also records ``clock_ms`` (agent clock) as the first send if none is
        recorded yet: the dedup horizon then counts from before the first
        PUBLISH even if the agent dies before its ``Sent`` update is committed.

        Raises:
            StorageError: nothing was committed; do not publish.
        """
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "UPDATE orders SET regions = CASE WHEN regions = '' THEN ?1 "
                "ELSE regions || ',' || ?1 END, "
                "first_sent_clock_ms = coalesce(first_sent_clock_ms, ?3) "
                "WHERE order_id = ?2 AND ',' || regions || ',' NOT LIKE '%,' || ?1 || ',%'",
                [(region, order_id, clock_ms) for order_id in order_ids],
            )
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise storage_error(exc, "add region") from exc

    def regions_of(self, order_id: str) -> tuple[str, ...]:
        """The order's committed geo ``attempts`` (``()`` if none or unknown)."""
        row = self.conn.execute(
            "SELECT regions FROM orders WHERE order_id = ?", (order_id,)
        ).fetchone()
        return tuple(row[0].split(",")) if row and row[0] else ()

    def make_all_due(self) -> None:
        """Make every unreceipted order due now (after a reconnect). Not fsynced."""
        self.conn.execute(
            "UPDATE orders SET next_retry_ms = 0 "
            "WHERE settled_ms IS NULL AND next_retry_ms > 0 AND state != 'held'"
        )

    def get(self, order_id: str) -> OrderRecord | None:
        """One order's local state."""
        row = self.conn.execute(
            f"SELECT {_COLUMNS} FROM orders WHERE order_id = ?", (order_id,)
        ).fetchone()
        return None if row is None else _order_record(row)

    def page(self, state: str | None, before_seq: int | None, limit: int) -> list[OrderRecord]:
        """Orders newest first, optionally of one state or pipeline status."""
        where = ["seq < ?"]
        args: list[int | str] = [before_seq if before_seq is not None else 2**63 - 1]
        if state is not None:
            where.append("(state = ? OR status = ?)")
            args += [state, state]
        rows = self.conn.execute(
            f"SELECT {_COLUMNS} FROM orders WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [_order_record(row) for row in rows]

    def stats(self) -> Stats:
        """Backlog depth and age."""
        conn = self.conn
        oldest = conn.execute(
            "SELECT created_ms FROM orders WHERE settled_ms IS NULL ORDER BY seq LIMIT 1"
        ).fetchone()
        total = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
        awaiting = conn.execute(
            "SELECT count(*) FROM orders WHERE status_query_ms IS NOT NULL"
        ).fetchone()[0]
        by_reason = dict(
            conn.execute(
                "SELECT reason, count(*) FROM orders WHERE settled_ms IS NULL AND reason IN (?, ?) "
                "GROUP BY reason",
                (AUTHORITY_UNREACHABLE, UNKNOWN_REGION),
            ).fetchall()
        )
        return Stats(
            self.pending_rows,
            self.pending_bytes,
            oldest[0] if oldest else None,
            total,
            awaiting,
            sum(by_reason.values()),
            by_reason.get(UNKNOWN_REGION, 0),
        )

    def expire(self, first_sent_before: int) -> list[str]:
        """Stop resending orders that were sent but never receipted for too long.

        The bridge forgets an order's dedup marker after its TTL (7 days); a
        resend after that would be appended twice. Such orders become
        ``rejected`` with reason ``unreceipted_expired``, for an operator to
        look at. Orders never sent are safe to send and stay; held orders stay
        held (``retry`` refuses them past the horizon). ``first_sent_before``
        is agent-clock ms.
        """
        stamp = now_ms()
        try:
            rows = self.conn.execute(
                "UPDATE orders SET state = 'rejected', reason = 'unreceipted_expired', "
                "settled_ms = ?, updated_ms = ? "
                "WHERE settled_ms IS NULL AND state != 'held' "
                "AND first_sent_clock_ms IS NOT NULL AND first_sent_clock_ms <= ? "
                "RETURNING order_id, size",
                (stamp, stamp, first_sent_before),
            ).fetchall()
        except sqlite3.Error as exc:
            self._rollback()
            raise storage_error(exc, "expire") from exc
        self.pending_rows -= len(rows)
        self.pending_bytes -= sum(size for _, size in rows)
        return [order_id for order_id, _ in rows]

    def prune(self, settled_before_ms: int) -> int:
        """Delete orders settled before the cutoff, then give the space back."""
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "UPDATE meta SET value = "
                "max(value, (SELECT coalesce(max(seq), -1) + 1 FROM orders)) "
                "WHERE key = 'next_seq'"
            )
            # Orders still waiting for their terminal status stay (status recovery).
            deleted = conn.execute(
                "DELETE FROM orders WHERE settled_ms IS NOT NULL AND settled_ms < ? "
                "AND status_query_ms IS NULL",
                (settled_before_ms,),
            ).rowcount
            conn.execute("COMMIT")
            if deleted:
                # executescript steps the pragma to the end; execute() frees one page.
                conn.executescript("PRAGMA incremental_vacuum")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            self._rollback()
            raise storage_error(exc, "prune") from exc
        return deleted

    def retry_held(self, order_ids: list[str] | None, first_sent_after: int) -> RetryResult:
        """Re-queue held orders (all of them when ``order_ids`` is None).

        A held order first sent at or before ``first_sent_after`` (agent clock)
        is past the dedup horizon: it stays held and is reported, never sent.
        """
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            if order_ids is None:
                rows = conn.execute(
                    "SELECT order_id, first_sent_clock_ms FROM orders "
                    "WHERE settled_ms IS NULL AND state = 'held' ORDER BY seq"
                ).fetchall()
                not_held: list[str] = []
            else:
                found = {
                    oid: sent
                    for oid, state, settled, sent in (
                        conn.execute(
                            "SELECT order_id, state, settled_ms, first_sent_clock_ms "
                            "FROM orders WHERE order_id = ?",
                            (oid,),
                        ).fetchone()
                        or (oid, None, None, None)
                        for oid in order_ids
                    )
                    if state == "held" and settled is None
                }
                rows = list(found.items())
                not_held = [oid for oid in order_ids if oid not in found]
            requeue = [oid for oid, sent in rows if sent is None or sent > first_sent_after]
            past = [oid for oid, sent in rows if not (sent is None or sent > first_sent_after)]
            stamp = now_ms()
            conn.executemany(
                "UPDATE orders SET state = 'queued', next_retry_ms = 0, updated_ms = ? "
                "WHERE order_id = ?",
                [(stamp, oid) for oid in requeue],
            )
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise storage_error(exc, "retry held") from exc
        self.held_rows -= len(requeue)
        return RetryResult(requeued=requeue, past_horizon=past, not_held=not_held)

    def status_queries_due(
        self, now: int, limit: int, sent_after: int
    ) -> tuple[list[tuple[str, int]], int]:
        """Accepted orders whose terminal status is overdue, with how often each was queried.

        At most ``limit``, the longest overdue first.
        Orders first sent at or before ``sent_after`` are past the dedup
        horizon: their queries stop (the count of them is returned; the
        orders become prunable). All times are agent-clock ms.
        """
        conn = self.conn
        try:
            gave_up = conn.execute(
                "UPDATE orders SET status_query_ms = NULL "
                "WHERE status_query_ms IS NOT NULL AND status_query_ms <= ? "
                "AND coalesce(first_sent_clock_ms, 0) <= ?",
                (now, sent_after),
            ).rowcount
            due = conn.execute(
                "SELECT order_id, status_queries FROM orders WHERE status_query_ms IS NOT NULL "
                "AND status_query_ms <= ? ORDER BY status_query_ms LIMIT ?",
                (now, limit),
            ).fetchall()
        except sqlite3.Error as exc:
            raise storage_error(exc, "status queries") from exc
        return [(order_id, queries) for order_id, queries in due], gave_up
