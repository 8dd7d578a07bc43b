"""The SQLite outbox: group commit, caps, idempotency, pruning, migrations, locking."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import schemas
from edge_agent import Outbox, OutboxFull, StorageError, Submitted
from edge_agent._migrations import MIGRATIONS, SCHEMA_VERSION
from edge_agent._records import NewOrder, Sent, Settle
from edge_agent._store import Store
from servicekit.clock import now_ms
from tests.helpers import make_order

DEVICE_ID = "dev-outbox"


def _exists(path: Path) -> bool:
    return path.exists()


def file_size(path: Path) -> int:
    """Size in bytes, 0 for a missing file."""
    return path.stat().st_size if path.exists() else 0


def new_order(owner: Outbox | Store, order_id: str, *, pad: int = 0) -> NewOrder:
    """Reserve the next seq and encode the order, as the agent does before submitting."""
    seq = owner.reserve_seq()
    attrs = {"pad": "x" * pad} if pad else None
    payload = schemas.encode(make_order(DEVICE_ID, seq, order_id=order_id, attrs=attrs))
    return NewOrder(order_id, seq, payload)


async def submit(outbox: Outbox, order_id: str, *, pad: int = 0) -> Submitted:
    """Submit one order the way the agent does."""
    return await outbox.submit(new_order(outbox, order_id, pad=pad))


async def test_concurrent_submits_share_transactions(tmp_path: Path) -> None:
    """Many concurrent submits are committed in far fewer transactions than orders."""
    async with Outbox(str(tmp_path / "o.db")) as outbox:
        calls: list[int] = []
        write = outbox.store.write

        def counting(orders: list[NewOrder], updates: list[Any]) -> Any:
            calls.append(len(orders))
            return write(orders, updates)

        outbox.store.write = counting  # type: ignore[method-assign]
        results = await asyncio.gather(*(submit(outbox, f"order-{i:04d}") for i in range(300)))
        assert len({r.seq for r in results}) == 300
        assert sum(calls) == 300
        assert len(calls) < 300 / 4, calls


async def test_full_outbox_refuses_and_keeps_existing(tmp_path: Path) -> None:
    """At the row cap a new order gets OutboxFull; stored ones stay; repeats still answer."""
    async with Outbox(str(tmp_path / "o.db"), max_rows=3) as outbox:
        for i in range(3):
            await submit(outbox, f"order-{i:04d}")
        before = [await outbox.get(f"order-{i:04d}") for i in range(3)]
        with pytest.raises(OutboxFull):
            await submit(outbox, "order-9999")
        assert await outbox.get("order-9999") is None
        assert [await outbox.get(f"order-{i:04d}") for i in range(3)] == before
        repeat = await submit(outbox, "order-0001")
        assert repeat.duplicate
        assert repeat.seq == before[1].seq  # type: ignore[union-attr]
        outbox.settle("order-0000", "accepted", None)
        await outbox.flush()
        assert (await submit(outbox, "order-9999")).state == "queued"


async def test_byte_cap(tmp_path: Path) -> None:
    """The byte cap refuses an order that would push unreceipted bytes past it."""
    async with Outbox(str(tmp_path / "o.db"), max_bytes=3000) as outbox:
        await submit(outbox, "order-big1", pad=2000)
        with pytest.raises(OutboxFull):
            await submit(outbox, "order-big2", pad=2000)


async def test_same_order_id_is_one_order(tmp_path: Path) -> None:
    """The same order_id twice, even concurrently, stores one order and answers the first seq."""
    async with Outbox(str(tmp_path / "o.db")) as outbox:
        a, b = await asyncio.gather(submit(outbox, "order-same"), submit(outbox, "order-same"))
        assert a.seq == b.seq
        assert [a.duplicate, b.duplicate].count(True) == 1
        stats = await outbox.stats()
        assert stats is not None
        assert stats.total_rows == 1


async def test_due_is_oldest_first_and_settled_orders_leave(tmp_path: Path) -> None:
    """Due orders come oldest first; sent ones wait for their retry; settled ones never return."""
    async with Outbox(str(tmp_path / "o.db")) as outbox:
        for i in range(5):
            await submit(outbox, f"order-{i:04d}")
        due = await outbox.due(now_ms(), 10, set())
        assert [d.order_id for d in due] == [f"order-{i:04d}" for i in range(5)]
        outbox.update(Sent("order-0000", now_ms() + 60_000, now_ms()))
        outbox.update(Settle("order-0001", "accepted", None))
        await outbox.flush()
        due = await outbox.due(now_ms(), 10, {"order-0002"})
        assert [d.order_id for d in due] == ["order-0003", "order-0004"]
        await outbox.make_all_due()
        assert "order-0000" in {d.order_id for d in await outbox.due(now_ms(), 10, set())}
        rec = await outbox.get("order-0000")
        assert rec is not None
        assert rec.state == "sent"
        assert rec.sends == 1


async def test_prune_gives_disk_space_back(tmp_path: Path) -> None:
    """Pruning receipted orders past retention shrinks the database and its WAL again."""
    path = tmp_path / "o.db"
    async with Outbox(str(path), max_rows=10_000) as outbox:
        ids = [f"order-{i:05d}" for i in range(3000)]
        await asyncio.gather(*(submit(outbox, i, pad=1000) for i in ids))
        for order_id in ids:
            outbox.settle(order_id, "accepted", None)
        await outbox.flush()
        await outbox.prune(now_ms() - 3_600_000)  # nothing is old enough yet
        full_size = file_size(path)
        assert full_size > 3_000_000
        deleted = await outbox.prune(now_ms() + 1)
        assert deleted == 3000
        assert file_size(path) < full_size / 10
        assert file_size(Path(f"{path}-wal")) == 0


def test_schema_version_and_upgrade_keeps_queue(tmp_path: Path) -> None:
    """A new database is at the current user_version; reopening keeps the queue."""
    path = str(tmp_path / "o.db")
    store = Store(path, max_rows=10, max_bytes=10**6)
    assert store.open() is None
    store.write([new_order(store, "order-keep")], [])
    store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    store = Store(path, max_rows=10, max_bytes=10**6)
    with pytest.raises(StorageError) as info:
        store.open()
    assert info.value.reason == "schema_too_new"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    conn.close()
    assert store.open() is None
    assert store.pending_rows == 1
    assert store.get("order-keep") is not None
    store.close()


def test_second_opener_is_locked_out(tmp_path: Path) -> None:
    """The exclusive lock keeps a second agent off the same queue, with reason ``locked``."""
    path = str(tmp_path / "o.db")
    first = Store(path, max_rows=10, max_bytes=10**6)
    first.open()
    second = Store(path, max_rows=10, max_bytes=10**6)
    with pytest.raises(StorageError) as info:
        second.open()
    assert info.value.reason == "locked"
    first.close()


def test_payload_carries_assigned_seq(tmp_path: Path) -> None:
    """The stored payload is the wire order with the seq the outbox assigned."""
    store = Store(str(tmp_path / "o.db"), max_rows=10, max_bytes=10**6)
    store.open()
    (result,) = store.write([new_order(store, "order-seq1")], [])
    assert isinstance(result, Submitted)
    (due,) = store.due(now_ms(), 1, frozenset())
    order = schemas.decode_order(due.payload)
    assert order.seq == result.seq
    assert msgspec.structs.replace(order, seq=0, created_at=0) == msgspec.structs.replace(
        make_order(DEVICE_ID, order_id="order-seq1"), created_at=0
    )
    store.close()


async def test_inline_memory_outbox(tmp_path: Path) -> None:
    """An in-memory outbox runs on the event loop without a writer thread."""
    async with Outbox(":memory:", inline=True) as outbox:
        result = await submit(outbox, "order-mem1")
        assert result.state == "queued"
        assert outbox._executor is None


async def test_sent_orders_past_max_age_expire(tmp_path: Path) -> None:
    """Sent-but-unreceipted orders past the resend age are rejected; never-sent ones stay."""
    async with Outbox(str(tmp_path / "o.db")) as outbox:
        await submit(outbox, "order-sent")
        await submit(outbox, "order-new1")
        outbox.mark_sent("order-sent", now_ms(), outbox.clock.now_ms())
        assert await outbox.expire(outbox.clock.now_ms() + 1) == ["order-sent"]
        rec = await outbox.get("order-sent")
        assert rec is not None
        assert (rec.state, rec.reason) == ("rejected", "unreceipted_expired")
        assert outbox.store.pending_rows == 1
        assert [d.order_id for d in await outbox.due(now_ms(), 10, set())] == ["order-new1"]


async def test_seq_survives_pruning_everything(tmp_path: Path) -> None:
    """After every order is pruned and the outbox reopened, seq still continues upwards."""
    path = str(tmp_path / "o.db")
    async with Outbox(path) as outbox:
        last = [await submit(outbox, f"order-{i:04d}") for i in range(3)][-1]
        for i in range(3):
            outbox.settle(f"order-{i:04d}", "accepted", None)
        await outbox.flush()
        assert await outbox.prune(now_ms() + 1) == 3
    async with Outbox(path) as outbox:
        assert (await submit(outbox, "order-next")).seq > last.seq


async def test_unexpected_write_failure_answers_every_submitter(tmp_path: Path) -> None:
    """A bug in a write fails that batch's submitters with a typed error; the writer lives on."""
    async with Outbox(str(tmp_path / "o.db")) as outbox:
        write = outbox.store.write

        def broken(orders: list[NewOrder], updates: list[Any]) -> Any:
            outbox.store.write = write  # type: ignore[method-assign]
            raise RuntimeError("boom")

        outbox.store.write = broken  # type: ignore[method-assign]
        with pytest.raises(StorageError) as info:
            await submit(outbox, "order-bug1")
        assert info.value.reason == "internal_error"
        assert (await submit(outbox, "order-bug2")).state == "queued"
        assert await outbox.get("order-bug1") is None


async def test_no_shared_memory_file(tmp_path: Path) -> None:
    """Exclusive locking keeps the WAL index on the heap: no -shm file, so no SIGBUS when full."""
    path = tmp_path / "o.db"
    async with Outbox(str(path)) as outbox:
        await submit(outbox, "order-shm1")
        assert file_size(Path(f"{path}-wal")) > 0
        assert not _exists(Path(f"{path}-shm"))


@settings(max_examples=25, deadline=None)
@given(ids=st.lists(st.sampled_from([f"order-dup{i}" for i in range(6)]), min_size=1, max_size=40))
async def test_any_interleaving_of_duplicates_is_one_order_each(ids: list[str]) -> None:
    """However ids repeat across concurrent submits, each is stored once and all answers agree."""
    async with Outbox(":memory:", inline=True) as outbox:
        results = await asyncio.gather(*(submit(outbox, order_id) for order_id in ids))
        stats = await outbox.stats()
        assert stats is not None
        assert stats.total_rows == len(set(ids))
        by_id: dict[str, set[int]] = {}
        for result in results:
            by_id.setdefault(result.order_id, set()).add(result.seq)
        for order_id, seqs in by_id.items():
            record = await outbox.get(order_id)
            assert record is not None
            assert seqs == {record.seq}
        assert sum(not r.duplicate for r in results) == len(set(ids))


def test_upgrade_from_v1_keeps_the_queue_and_starts_the_agent_clock(tmp_path: Path) -> None:
    """A v1 outbox (wall-clock retry times) upgrades in place: rows kept, all due, clock set."""
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(MIGRATIONS[0] + "; PRAGMA user_version=1;")
    conn.execute(
        "INSERT INTO orders (seq, order_id, payload, size, state, attempts, next_retry_ms, "
        "created_ms, updated_ms) VALUES (0, 'old-sent-01', x'00', 1, 'sent', 2, ?, 1000, 1000)",
        (now_ms() + 3_600_000,),
    )
    conn.close()
    store = Store(str(path), max_rows=10, max_bytes=10_000)
    assert store.open() is None
    try:
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert abs(store.clock.now_ms() - now_ms()) < 60_000  # starts at the wall time
        (due,) = store.due(store.clock.now_ms(), 10, frozenset())  # wall-clock retry reset
        assert due.order_id == "old-sent-01"
        # First sent counts from creation (ms 1000): long past any horizon.
        assert store.expire(store.clock.now_ms() - 6 * 24 * 3600 * 1000) == ["old-sent-01"]
    finally:
        store.close()
