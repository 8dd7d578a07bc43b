"""Order state: the context a batch carries per order, loading it and storing its outcome.

An order is a ``(device_id, order_id)`` pair; its record is the hash
``order:{device_id}:{order_id}``. Its status moves
``received → validated → reserved → confirmed → fulfilled``, or ends early in
``rejected`` or ``failed``. A batch loads every order's state in one script,
runs the steps in memory (only stock reservation touches Redis in between, in
its own atomic, idempotent script), then stores each order's outcome (status,
``done:{step}`` markers, history, events) with one compare-and-set per order in
one script for the batch. A redelivered entry skips the steps it already passed
and never stores one twice.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import redis.asyncio as aioredis

from schemas import Order
from servicekit.clock import now_ms

from ._lua import Scripts
from .names import (
    EVENTS_MAXLEN,
    EVENTS_STREAM,
    RETENTION_KEY,
    STOCK_KEY,
    TERMINAL_STATUSES,
    device_index_key,
    history_key,
    order_devices_key,
    order_key,
    reservation_key,
)

# The statuses a device hears about (schemas.Status.status).
PUBLISHED_STATUSES: Final = frozenset({"confirmed", "rejected", "fulfilled", "failed"})


def text(value: bytes | str) -> str:
    """Redis replies come as bytes; keys and codes are UTF-8 text."""
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One entry of an ``orders:{N}`` stream, as the bridge wrote it."""

    stream: str
    entry_id: str
    fields: dict[str, bytes]
    deliveries: int = 1

    @property
    def payload(self) -> bytes:
        """The order's MessagePack bytes."""
        return self.fields.get("payload", b"")


@dataclass(frozen=True, slots=True)
class Transition:
    """What a step decided for one order: a new status (or none) and a reason code."""

    status: str | None
    reason: str = ""


@dataclass(slots=True)
class OrderContext:
    """One order travelling through the steps of one batch."""

    entry: StreamEntry
    order: Order
    status: str = "received"
    reason: str = ""  # reason code of the current status
    done: set[str] = field(default_factory=set)
    proposed: Transition | None = None
    error: str | None = None  # set when a step raised: the entry is not acked
    stale: bool = False  # another consumer moved the order on: leave it to them
    stored: str | None = None  # the status in Redis when the batch loaded it; None = no record
    changes: list[tuple[str, str, str]] = field(default_factory=list)  # (status, step, reason)
    done_now: list[str] = field(default_factory=list)  # steps passed in this batch

    @property
    def live(self) -> bool:
        """Still to be worked on in this batch."""
        return self.status not in TERMINAL_STATUSES and self.error is None and not self.stale

    def advance(self, status: str | None = None) -> None:
        """The step succeeded; move to ``status`` (or stay where it is)."""
        self.proposed = Transition(status)

    def reject(self, reason: str) -> None:
        """The order cannot be served as asked (catalog, stock): ends ``rejected``."""
        self.proposed = Transition("rejected", reason)

    def fail(self, reason: str) -> None:
        """The order broke down past the point of no return (payment): ends ``failed``."""
        self.proposed = Transition("failed", reason)

    def settle(self, step: str) -> None:
        """Apply the step's decision in memory; :func:`commit` stores it with the rest."""
        proposed, self.proposed = self.proposed, None
        if proposed is None or self.stale:
            return
        self.done.add(step)
        self.done_now.append(step)
        if proposed.status and proposed.status != self.status:
            self.status, self.reason = proposed.status, proposed.reason
            self.changes.append((proposed.status, step, proposed.reason))

    @property
    def dirty(self) -> bool:
        """Something to store: a new record, a step passed, or an error."""
        return self.stored is None or bool(self.done_now) or self.error is not None


def index_member(seq: int, order_id: str) -> str:
    """Member of the device index: lexicographic order = seq order, ties by order_id."""
    return f"{seq:020d}:{order_id}"


_json = msgspec.json.encode


def _items_json(order: Order) -> str:
    return json.dumps(
        [{"sku": i.sku, "qty": i.qty, "unit_price": i.unit_price} for i in order.items]
    )


async def load(
    client: aioredis.Redis, scripts: Scripts, batch: Sequence[tuple[StreamEntry, Order]]
) -> list[OrderContext]:
    """Each order's stored state (status, reason, steps done): one read-only script call.

    An order without a record starts ``received``; its record is created by
    :func:`commit`.
    """
    keys = [order_key(order.device_id, order.order_id) for _entry, order in batch]
    replies = await scripts.run(client, "load", [], [_json(keys)])
    out = []
    for (entry, order), reply in zip(batch, replies, strict=True):
        if not reply:
            ctx = OrderContext(entry, order)
            ctx.changes.append(("received", "", ""))
        else:
            status = text(reply[0])
            ctx = OrderContext(entry, order, status=status, reason=text(reply[1]),
                               done={text(step) for step in reply[2]}, stored=status)  # fmt: skip
        out.append(ctx)
    return out


def _row(ctx: OrderContext, now: str) -> tuple[Any, ...]:
    order = ctx.order
    dev, oid = order.device_id, order.order_id
    fields: list[str] = []
    if ctx.stored is None:
        fields += ["order_id", oid, "device_id", dev, "seq", str(order.seq),
                   "received_at", text(ctx.entry.fields.get("received_at", b"0")),
                   "total", str(order.total), "currency", order.currency,
                   "items", _items_json(order), "stream", ctx.entry.stream,
                   "entry_id", ctx.entry.entry_id, "created", now]  # fmt: skip
    if ctx.changes or ctx.stored is None:
        fields += ["status", ctx.status, "reason", ctx.reason, "updated_at", now]
    for step in ctx.done_now:
        fields += ["done:" + step, now]
    if ctx.error is not None:
        fields += ["last_error", ctx.error]
    return (
        order_key(dev, oid), history_key(dev, oid), reservation_key(dev, oid),
        ctx.stored or "", fields, ctx.changes, oid, dev, device_index_key(dev),
        index_member(order.seq, oid), order_devices_key(oid),
    )  # fmt: skip


async def commit(
    client: aioredis.Redis,
    scripts: Scripts,
    batch: Sequence[OrderContext],
    *,
    retention_ms: int = 0,
) -> list[OrderContext]:
    """Store what the batch did to each order, each atomically, in one script call.

    An order that ends here expires ``retention_ms`` later (0: kept for ever).

    Returns the contexts stored now (their ``changes`` are to be published);
    contexts whose record moved under them are marked ``stale`` and store
    nothing.
    """
    todo = [ctx for ctx in batch if ctx.dirty and not ctx.stale]
    if not todo:
        return []
    now = now_ms()
    rows = [_row(ctx, str(now)) for ctx in todo]
    replies = await scripts.run(
        client,
        "commit",
        [EVENTS_STREAM, STOCK_KEY, RETENTION_KEY],
        [now, EVENTS_MAXLEN, _json(rows), retention_ms],
    )
    stored = []
    for ctx, code in zip(todo, replies, strict=True):
        if code == -1:
            ctx.stale = True
        else:
            ctx.stored = ctx.status
            stored.append(ctx)
    return stored


async def forget_expired(
    client: aioredis.Redis, scripts: Scripts, *, limit: int = 1000, now: int | None = None
) -> int:
    """Drop index members of orders whose retention ended; returns how many orders."""
    forgotten: int = await scripts.run(
        client, "forget", [RETENTION_KEY], [now_ms() if now is None else now, limit]
    )
    return forgotten


async def find_devices(client: aioredis.Redis, order_id: str) -> list[str]:
    """The devices that have an order with this id, sorted."""
    members: Any = await client.smembers(order_devices_key(order_id))
    return sorted(text(m) for m in members)


async def order_statuses(
    redis: aioredis.Redis, refs: Sequence[tuple[str, str]], *, page: int = 5000
) -> list[str | None]:
    """The current status of each ``(device_id, order_id)``, None when it has no record.

    One pipelined round trip per ``page`` orders; the fleet verifier uses it to
    find orders stuck short of a terminal state.
    """
    out: list[str | None] = []
    for start in range(0, len(refs), page):
        async with redis.pipeline(transaction=False) as pipe:
            for device_id, order_id in refs[start : start + page]:
                pipe.hget(order_key(device_id, order_id), "status")
            replies = await pipe.execute()
        out += [None if r is None else text(r) for r in replies]
    return out


async def load_order(
    client: aioredis.Redis, device_id: str, order_id: str
) -> dict[str, Any] | None:
    """The record and history of one order, as the orders API shows it; None if unknown."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(order_key(device_id, order_id))
        pipe.lrange(history_key(device_id, order_id), 0, -1)
        raw, history = await pipe.execute()
    if not raw:
        return None
    record = {text(k): text(v) for k, v in raw.items()}
    return {
        "order_id": record["order_id"],
        "device_id": record["device_id"],
        "seq": int(record["seq"]),
        "status": record["status"],
        "reason": record.get("reason") or None,
        "total": int(record["total"]),
        "currency": record["currency"],
        "items": json.loads(record.get("items", "[]")),
        "received_at": int(record.get("received_at") or 0),
        "updated_at": int(record["updated_at"]),
        "stream": record["stream"],
        "entry_id": record["entry_id"],
        "steps_done": sorted(k[5:] for k in record if k.startswith("done:")),
        "last_error": record.get("last_error") or None,
        "history": [json.loads(text(h)) for h in history],
    }
