"""Order state: the context a batch carries per order, and storing its transitions.

An order's record is the hash ``order:{order_id}``; its status moves
``received → validated → reserved → confirmed → fulfilled``, or ends early in
``rejected`` or ``failed``. Each step that finished is marked ``done:{step}`` in
the record by the same Lua script that changes the status, so a redelivered
entry skips the steps it already passed and never applies one twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import redis.asyncio as aioredis

from schemas import Order

from ._lua import Scripts
from .names import (
    EVENTS_MAXLEN,
    EVENTS_STREAM,
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


def now_ms() -> int:
    """Wall clock in ms since the epoch, for records and events."""
    return time.time_ns() // 1_000_000


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


def index_member(seq: int, order_id: str) -> str:
    """Member of the device index: lexicographic order = seq order, ties by order_id."""
    return f"{seq:020d}:{order_id}"


_json = msgspec.json.encode


def _items_json(order: Order) -> str:
    return json.dumps(
        [{"sku": i.sku, "qty": i.qty, "unit_price": i.unit_price} for i in order.items]
    )


async def admit(
    client: aioredis.Redis, scripts: Scripts, batch: Sequence[tuple[StreamEntry, Order]]
) -> list[OrderContext]:
    """Create each order's record if new and load its state: one script call for the batch."""
    rows = [
        (
            order_key(order.device_id, order.order_id),
            history_key(order.device_id, order.order_id),
            device_index_key(order.device_id),
            order.order_id,
            order.device_id,
            str(order.seq),
            text(entry.fields.get("received_at", b"0")),
            str(order.total),
            order.currency,
            index_member(order.seq, order.order_id),
            _items_json(order),
            entry.stream,
            entry.entry_id,
            order_devices_key(order.order_id),
        )
        for entry, order in batch
    ]
    replies = await scripts.evalsha(
        client, "admit", [EVENTS_STREAM], [now_ms(), EVENTS_MAXLEN, _json(rows)]
    )
    return [
        OrderContext(
            entry,
            order,
            status=text(reply[0]),
            reason=text(reply[1]),
            done={text(step) for step in reply[2]},
        )
        for (entry, order), reply in zip(batch, replies, strict=True)
    ]


async def commit(
    client: aioredis.Redis, scripts: Scripts, step: str, batch: Sequence[OrderContext]
) -> list[OrderContext]:
    """Store the step's proposed transitions, each atomically, in one script call.

    Returns the contexts whose status really changed now (to publish); contexts
    whose record moved under them are marked ``stale``.
    """
    todo = [ctx for ctx in batch if ctx.proposed is not None]
    if not todo:
        return []
    rows = []
    for ctx in todo:
        dev, oid, proposed = ctx.order.device_id, ctx.order.order_id, ctx.proposed
        assert proposed is not None
        rows.append((order_key(dev, oid), history_key(dev, oid), reservation_key(dev, oid),
                     ctx.status, proposed.status or "", proposed.reason))  # fmt: skip
    changed: list[OrderContext] = []
    replies = await scripts.evalsha(
        client,
        "transition",
        [EVENTS_STREAM, STOCK_KEY],
        [step, now_ms(), EVENTS_MAXLEN, _json(rows)],
    )
    for ctx, (code, status) in zip(todo, replies, strict=True):
        proposed, ctx.proposed = ctx.proposed, None
        if code == -1:
            ctx.stale = True
            continue
        ctx.done.add(step)
        before, ctx.status = ctx.status, text(status)
        if code == 1 and proposed is not None and proposed.status and ctx.status != before:
            ctx.reason = proposed.reason
            changed.append(ctx)
    return changed


async def record_error(client: aioredis.Redis, batch: Sequence[OrderContext]) -> None:
    """Remember each failed order's last error, for its DLQ entry later."""
    failed = [ctx for ctx in batch if ctx.error is not None]
    if not failed:
        return
    async with client.pipeline(transaction=False) as pipe:
        for ctx in failed:
            pipe.hset(
                order_key(ctx.order.device_id, ctx.order.order_id), "last_error", ctx.error or ""
            )
        await pipe.execute()


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
