"""Order state: the context a batch carries per order, loading it and storing its outcome.

An order is a ``(device_id, order_id)`` pair; its record is the hash
``order:{N}:{device_id}:{order_id}`` in its shard's slot (:mod:`pipeline.names`). Its status moves
``received → validated → reserved → confirmed → fulfilled``, or ends early in
``rejected`` or ``failed``. A batch loads every order's state with one script
call per shard (all in one pipeline), runs the steps in memory (only stock
reservation touches Redis in between, in its own atomic, idempotent script),
then stores each order's outcome (status, steps done, history, one event) with
one compare-and-set per order in one script call per shard. A redelivered
entry skips the steps it already passed and never stores one twice.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from schemas import Order
from schemas.names import shard_of
from servicekit.clock import now_ms
from servicekit.redis_clients import text

from ._calls import AnyRedis, Rider, call_plan, run_calls, run_calls_with
from ._lua import Scripts
from .names import (
    TERMINAL_STATUSES,
    device_index_key_in,
    events_key,
    events_maxlen,
    order_devices_key,
    order_key,
    order_key_in,
    retention_key,
    shard_tag,
    stock_key,
)

# The statuses a device hears about (schemas.Status.status).
PUBLISHED_STATUSES: Final = frozenset({"confirmed", "rejected", "fulfilled", "failed"})


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
    shard: int = 0  # the device's shard: every key of the order carries its tag
    status: str = "received"
    reason: str = ""  # reason code of the current status
    done: set[str] = field(default_factory=set)
    proposed: Transition | None = None
    error: str | None = None  # set when a step raised: the entry is not acked
    stale: bool = False  # another consumer moved the order on: leave it to them
    stored: str | None = None  # the status in Redis when the batch loaded it; None = no record
    changes: list[tuple[str, str, str]] = field(default_factory=list)  # (status, step, reason)
    done_now: list[str] = field(default_factory=list)  # steps passed in this batch
    presumed: bool = False  # not read: started as new (load's presume_new)

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
    """Compact ``[[sku, qty, unit_price], ...]``: short enough for Redis's listpack
    encoding of the record (values up to 64 bytes) for typical orders, which
    costs far less memory and CPU than a hashtable."""
    return _json([[i.sku, i.qty, i.unit_price] for i in order.items]).decode()


def _items(raw: str) -> list[dict[str, Any]]:
    items = json.loads(raw or "[]")
    return [
        item if isinstance(item, dict) else {"sku": item[0], "qty": item[1], "unit_price": item[2]}
        for item in items
    ]


def by_shard(indexes: Sequence[int], shard_of_index: Sequence[int]) -> dict[int, list[int]]:
    """Group positions by shard, keeping their order within each shard."""
    groups: dict[int, list[int]] = {}
    for i in indexes:
        groups.setdefault(shard_of_index[i], []).append(i)
    return groups


async def load(
    client: AnyRedis,
    scripts: Scripts,
    batch: Sequence[tuple[StreamEntry, Order]],
    *,
    shards: int,
    riders: Sequence[Rider] = (),
    presume_new: bool = False,
) -> list[OrderContext]:
    """Each order's stored state (status, reason, steps done): one read-only script per shard.

    An order without a record starts ``received``; its record is created by
    :func:`commit`. The ``riders``' reads (the steps' own, such as the
    catalog's prices) go out in the same round trip.

    ``presume_new``: an entry delivered for the first time is not read; its
    order starts ``received`` as if it had no record (``presumed``). Almost
    every one has none, and for the rare one that has (a dead letter replayed,
    an entry appended twice) :func:`commit`'s compare-and-set stores nothing and
    marks it ``stale``; the worker then loads it and runs it again.
    """
    shard_list = [shard_of(order.device_id, shards) for _entry, order in batch]
    read = [i for i, (entry, _order) in enumerate(batch)
            if not presume_new or entry.deliveries > 1]  # fmt: skip
    keys = {i: order_key_in(shard_list[i], batch[i][1].device_id, batch[i][1].order_id)
            for i in read}  # fmt: skip
    groups = by_shard(read, shard_list)
    plan = call_plan(client, list(groups))
    calls = [
        ([stock_key(shard) for shard in part],
         [_json([keys[i] for shard in part for i in groups[shard]])])
        for part in plan
    ]  # fmt: skip
    replies: list[Any] = [None] * len(batch)
    if riders:
        orders = [order for _entry, order in batch]
        loaded = await run_calls_with(client, scripts, "load", calls, riders=riders, orders=orders)
    else:
        loaded = await run_calls(client, scripts, "load", calls)
    for part, reply in zip(plan, loaded, strict=True):
        for i, one in zip([i for shard in part for i in groups[shard]], reply, strict=True):
            replies[i] = one
    out = []
    for i, ((entry, order), shard, reply) in enumerate(
        zip(batch, shard_list, replies, strict=True)
    ):
        if not reply:
            ctx = OrderContext(entry, order, shard, presumed=i not in keys)
            ctx.changes.append(("received", "", ""))
        else:
            status = text(reply[0])
            steps = text(reply[2])
            ctx = OrderContext(entry, order, shard, status=status, reason=text(reply[1]),
                               done=set(steps.split(",")) if steps else set(),
                               stored=status)  # fmt: skip
        out.append(ctx)
    return out


def history_lines(changes: Sequence[tuple[str, str, str]], at: int) -> list[str]:
    """A batch's transitions as history entries ``[status, step, reason, at]`` (JSON)."""
    return [_json([status, step, reason, at]).decode() for status, step, reason in changes]


def parse_history(record: dict[str, str]) -> list[dict[str, Any]]:
    """The history of a record (its ``h:1`` … ``h:{hn}`` fields): transitions, oldest first."""
    out = []
    for n in range(1, int(record.get("hn") or 0) + 1):
        raw = record.get(f"h:{n}")
        if raw:
            status, step, reason, at = json.loads(raw)
            out.append({"status": status, "step": step, "reason": reason, "at": at})
    return out


def _row(ctx: OrderContext, now: int) -> tuple[Any, ...]:
    order = ctx.order
    dev, oid = order.device_id, order.order_id
    stamp = str(now)
    fields: list[str] = []
    lines = history_lines(ctx.changes, now)
    if ctx.stored is None:
        fields += ["order_id", oid, "device_id", dev, "seq", str(order.seq),
                   "received_at", text(ctx.entry.fields.get("received_at", b"0")),
                   "total", str(order.total), "currency", order.currency,
                   "items", _items_json(order), "stream", ctx.entry.stream,
                   "entry_id", ctx.entry.entry_id, "created", stamp]  # fmt: skip
        for n, line in enumerate(lines, 1):
            fields += [f"h:{n}", line]
        fields += ["hn", str(len(lines))]
        lines = []
    if ctx.changes or ctx.stored is None:
        fields += ["status", ctx.status, "reason", ctx.reason, "updated_at", stamp]
    if ctx.done_now:
        fields += ["steps", ",".join(sorted(ctx.done))]
    if ctx.error is not None:
        fields += ["last_error", ctx.error]
    final = step = reason = path = ""
    if ctx.changes:
        final, step, reason = ctx.changes[-1]
        path = ">".join(status for status, _step, _reason in ctx.changes)
    return (
        order_key_in(ctx.shard, dev, oid), ctx.stored or "", fields, lines, final, step, reason,
        path, oid, dev, device_index_key_in(ctx.shard, dev), index_member(order.seq, oid),
        order_devices_key(oid, ctx.shard),
    )  # fmt: skip


async def commit(
    client: AnyRedis,
    scripts: Scripts,
    batch: Sequence[OrderContext],
    *,
    shards: int,
    retention_ms: int = 0,
) -> list[OrderContext]:
    """Store what the batch did to each order, each atomically, one script call per shard.

    An order that ends here expires ``retention_ms`` later (0: kept for ever).

    Returns the contexts stored now (their ``changes`` are to be published);
    contexts whose record moved under them are marked ``stale`` and store
    nothing.
    """
    todo = [ctx for ctx in batch if ctx.dirty and not ctx.stale]
    if not todo:
        return []
    now = now_ms()
    groups = by_shard(range(len(todo)), [ctx.shard for ctx in todo])
    plan = call_plan(client, list(groups))
    maxlen = events_maxlen(shards)
    calls = [
        (
            [key for shard in part
             for key in (events_key(shard), stock_key(shard), retention_key(shard))],
            [now, maxlen, msgspec.msgpack.encode([
                (events_key(shard), stock_key(shard), retention_key(shard),
                 [_row(todo[i], now) for i in groups[shard]])
                for shard in part
            ]), retention_ms],
        )
        for part in plan
    ]  # fmt: skip
    replies = await run_calls(client, scripts, "commit", calls)
    stored = []
    for part, codes in zip(plan, replies, strict=True):
        for i, code in zip([i for shard in part for i in groups[shard]], codes, strict=True):
            ctx = todo[i]
            if code == -1:
                ctx.stale = True
            else:
                ctx.stored = ctx.status
                stored.append(ctx)
    return stored


async def forget_expired(
    client: AnyRedis,
    scripts: Scripts,
    *,
    shards: int,
    limit: int = 100,
    now: int | None = None,
) -> int:
    """Drop index members of orders whose retention ended; returns how many orders."""
    at = now_ms() if now is None else now
    # limit: retention entries (commits), each listing the orders one commit ended
    calls = [([retention_key(shard)], [at, limit, shard_tag(shard)]) for shard in range(shards)]
    return sum(int(n) for n in await run_calls(client, scripts, "forget", calls))


async def find_devices(client: AnyRedis, order_id: str, *, shards: int) -> list[str]:
    """The devices that have an order with this id, sorted (one read per shard, pipelined)."""
    async with client.pipeline(transaction=False) as pipe:
        for shard in range(shards):
            pipe.smembers(order_devices_key(order_id, shard))
        replies: list[Any] = await pipe.execute()
    return sorted(text(m) for members in replies for m in members)


async def order_statuses(
    redis: AnyRedis, refs: Sequence[tuple[str, str]], *, shards: int, page: int = 5000
) -> list[str | None]:
    """The current status of each ``(device_id, order_id)``, None when it has no record.

    One pipelined round trip per ``page`` orders; the fleet verifier uses it to
    find orders stuck short of a terminal state.
    """
    out: list[str | None] = []
    for start in range(0, len(refs), page):
        async with redis.pipeline(transaction=False) as pipe:
            for device_id, order_id in refs[start : start + page]:
                pipe.hget(order_key(device_id, order_id, shards), "status")
            replies = await pipe.execute()
        out += [None if r is None else text(r) for r in replies]
    return out


async def order_histories(
    redis: AnyRedis, refs: Sequence[tuple[str, str]], *, shards: int, page: int = 5000
) -> list[list[dict[str, Any]]]:
    """Each order's history (its transitions, oldest first; [] without a record)."""
    out: list[list[dict[str, Any]]] = []
    for start in range(0, len(refs), page):
        async with redis.pipeline(transaction=False) as pipe:
            for device_id, order_id in refs[start : start + page]:
                pipe.hgetall(order_key(device_id, order_id, shards))
            replies = await pipe.execute()
        out += [parse_history({text(k): text(v) for k, v in r.items()}) for r in replies]
    return out


async def load_order(
    client: AnyRedis, device_id: str, order_id: str, *, shards: int
) -> dict[str, Any] | None:
    """The record and history of one order, as the orders API shows it; None if unknown."""
    raw: Any = await client.hgetall(order_key(device_id, order_id, shards))
    record = {text(k): text(v) for k, v in raw.items()}
    if "status" not in record:
        return None  # nothing, or only a reservation made before the record was stored
    steps = record.get("steps", "")
    return {
        "order_id": record["order_id"],
        "device_id": record["device_id"],
        "seq": int(record["seq"]),
        "status": record["status"],
        "reason": record.get("reason") or None,
        "total": int(record["total"]),
        "currency": record["currency"],
        "items": _items(record.get("items", "[]")),
        "received_at": int(record.get("received_at") or 0),
        "updated_at": int(record["updated_at"]),
        "stream": record["stream"],
        "entry_id": record["entry_id"],
        "steps_done": sorted(steps.split(",")) if steps else [],
        "last_error": record.get("last_error") or None,
        "history": parse_history(record),
    }


async def read_events(
    redis: AnyRedis, shards: int, *, page: int = 1000
) -> AsyncIterator[dict[str, str]]:
    """Every order event of every shard's events stream, shard by shard, oldest first.

    An ``orders:{N}:events`` entry lists the orders one commit changed (field
    ``orders``: JSON ``[[order_id, device_id, status, step, reason, path], …]``,
    plus ``at``); each comes out as one dict with those keys.
    """
    names = ("order_id", "device_id", "status", "step", "reason", "path")
    for shard in range(shards):
        start = "-"
        while rows := await _xrange(redis, events_key(shard), start, page):
            for _entry_id, fields in rows:
                at = text(fields.get(b"at", b"0"))
                for row in json.loads(fields.get(b"orders", b"[]")):
                    yield {**dict(zip(names, row, strict=True)), "at": at}
            start = "(" + text(rows[-1][0])


async def _xrange(redis: AnyRedis, key: str, start: str, count: int) -> Any:
    # Any: redis-py types XRANGE rows as optional.
    return await redis.xrange(key, min=start, max="+", count=count)
