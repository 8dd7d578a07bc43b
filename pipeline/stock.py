"""Stock: partitioned per shard, reserved per order atomically and once, rebalanced on demand.

Each shard N holds its own part of every SKU's stock in ``pipeline:{N}:stock``,
in the slot of its orders, so reserving all lines of an order, and giving them
back when it fails, stays one atomic script call with the order's record,
also on Redis Cluster (no script crosses slots). Loading a catalog spreads each
SKU's units evenly over the shards.

When an order's shard runs short of a SKU that other shards still have, the
reserve step moves units over (:func:`rebalance`) and tries once more; only
an order the whole deployment cannot serve is rejected ``out_of_stock``. A
move is two calls, each atomic in its own slot: ``take`` (the donor gives up
units and logs the transfer in ``pipeline:{M}:transfers``) and ``give`` (the
receiver adds them once per transfer id), then the log entry is removed. A
worker killed in between leaves the log entry; :func:`settle_transfers` (every
worker, at start and every minute) completes it. Units are therefore never lost
or doubled: total stock = Σ shards + Σ logged transfers.

An order is a ``(device_id, order_id)`` pair: ids are unique per device only.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, Final

import msgspec
import structlog

from servicekit.clock import now_ms
from servicekit.redis_clients import text

from ._calls import AnyRedis, call_plan, run_calls
from ._lua import Scripts
from .names import order_key_in, stock_key, transfer_in_key, transfers_key
from .records import OrderContext, by_shard
from .steps import Step, StepDeps, register

log = structlog.get_logger(__name__)
OUT_OF_STOCK: Final = "out_of_stock"
# A transfer's received marker outlives any retry of its `give` by far: the log
# entry that drives retries is settled within a minute while any worker runs.
TRANSFER_MARKER_TTL_S: Final = 7 * 24 * 3600
SETTLE_AFTER_MS: Final = 5_000  # a logged transfer older than this was abandoned


def split(units: int, shards: int) -> list[int]:
    """``units`` spread over ``shards`` as evenly as whole units go."""
    base, extra = divmod(units, shards)
    return [base + (1 if shard < extra else 0) for shard in range(shards)]


async def reserve(
    client: AnyRedis, scripts: Scripts, batch: Sequence[OrderContext], *, shards: int
) -> list[str]:
    """Reserve each order's lines, in batch order: one script call (one per shard on a cluster).

    Returns one result per order: ``reserved`` (now), ``held`` (earlier),
    ``released``, ``terminal`` or ``short:<sku>=<missing>,…``.
    """
    groups = by_shard(range(len(batch)), [ctx.shard for ctx in batch])
    plan = call_plan(client, list(groups))
    calls = [
        ([stock_key(shard) for shard in part],
         [msgspec.json.encode([row for shard in part
                               for row in _reserve_rows(batch, shard, groups[shard])])])
        for part in plan
    ]  # fmt: skip
    out = [""] * len(batch)
    for part, replies in zip(plan, await run_calls(client, scripts, "reserve", calls),
                             strict=True):  # fmt: skip
        for i, reply in zip([i for shard in part for i in groups[shard]], replies, strict=True):
            out[i] = text(reply)
    return out


def _reserve_rows(
    batch: Sequence[OrderContext], shard: int, positions: list[int]
) -> list[tuple[str, list[str], str]]:
    """One shard's orders as RESERVE rows ``[record, [sku, qty, ...], stock]``.

    A plain loop with the shard's stock key made once per shard: the nested
    comprehension it replaced (the stock key made and ``batch[i]`` looked up
    three times per order) cost three times as much per order (issue 25).
    """
    stock = stock_key(shard)
    rows = []
    for i in positions:
        order = batch[i].order
        lines: list[str] = []
        for item in order.items:
            lines += (item.sku, str(item.qty))
        rows.append((order_key_in(shard, order.device_id, order.order_id), lines, stock))
    return rows


def shortfalls(result: str) -> dict[str, int]:
    """``short:A=2,B=1`` → ``{"A": 2, "B": 1}``."""
    missing = {}
    for part in result.removeprefix("short:").split(","):
        sku, _, units = part.rpartition("=")
        missing[sku] = int(units)
    return missing


async def rebalance(
    client: AnyRedis, scripts: Scripts, wanted: dict[tuple[int, str], int], *, shards: int
) -> int:
    """Move units to each ``(shard, sku)`` that misses some, from the shards with most.

    Takes at least what is missing and up to half of a donor's units, so a
    draining shard does not come back for every order. Returns units moved.
    """
    skus = sorted({sku for _shard, sku in wanted})
    levels = await _levels(client, skus, shards)
    moved = 0
    for (shard, sku), short_by in sorted(wanted.items()):
        missing = short_by
        donors = sorted(
            (s for s in range(shards) if s != shard and levels[s].get(sku, 0) > 0),
            key=lambda s: -levels[s].get(sku, 0),
        )
        for donor in donors:
            if missing <= 0:
                break
            have = levels[donor][sku]
            taken = await transfer(client, scripts, sku, (donor, shard), max(missing, have // 2))
            levels[donor][sku] = have - taken
            levels[shard][sku] = levels[shard].get(sku, 0) + taken
            missing -= taken
            moved += taken
    return moved


async def transfer(
    client: AnyRedis, scripts: Scripts, sku: str, route: tuple[int, int], units: int
) -> int:
    """Move up to ``units`` of ``sku`` from shard ``route[0]`` to ``route[1]``; returns units."""
    donor, target = route
    transfer_id = uuid.uuid4().hex
    taken = int(
        await scripts.run(
            client, "take", [stock_key(donor), transfers_key(donor)],
            [transfer_id, sku, units, target, now_ms()],
        )
    )  # fmt: skip
    if taken:
        member = json.dumps([transfer_id, sku, str(taken), str(target)], separators=(",", ":"))
        await _complete(client, scripts, donor, member)
    return taken


async def _complete(client: AnyRedis, scripts: Scripts, donor: int, member: str) -> None:
    """Give a logged transfer to its target (once), then drop it from the donor's log."""
    transfer_id, sku, units, target = json.loads(member)
    target = int(target)
    await scripts.run(
        client, "give", [stock_key(target), transfer_in_key(target, transfer_id)],
        [sku, units, TRANSFER_MARKER_TTL_S],
    )  # fmt: skip
    await client.zrem(transfers_key(donor), member)


async def settle_transfers(
    client: AnyRedis, scripts: Scripts, *, shards: int, older_than_ms: int = SETTLE_AFTER_MS
) -> int:
    """Complete transfers a dead worker left half done (taken, maybe not given)."""
    settled = 0
    cutoff = now_ms() - older_than_ms
    for donor in range(shards):
        rows: Any = await client.zrange(transfers_key(donor), "-inf", cutoff, byscore=True)
        for raw in rows:
            await _complete(client, scripts, donor, text(raw))
            settled += 1
    if settled:
        log.info("stock_transfers_settled", transfers=settled)
    return settled


async def _levels(client: AnyRedis, skus: Sequence[str], shards: int) -> list[dict[str, int]]:
    async with client.pipeline(transaction=False) as pipe:
        for shard in range(shards):
            pipe.hmget(stock_key(shard), list(skus))
        replies: list[Any] = await pipe.execute()
    return [
        {sku: int(v) for sku, v in zip(skus, values, strict=True) if v is not None}
        for values in replies
    ]


async def stock_levels(
    client: AnyRedis, shards: int, skus: Iterable[str] | None = None
) -> dict[str, int]:
    """Units on hand per SKU over the whole deployment: Σ shards + Σ transfers in flight."""
    async with client.pipeline(transaction=False) as pipe:
        for shard in range(shards):
            pipe.hgetall(stock_key(shard))
            pipe.zrange(transfers_key(shard), 0, -1)
        replies: list[Any] = await pipe.execute()
    total: Counter[str] = Counter()
    for shard in range(shards):
        for sku, units in replies[2 * shard].items():
            total[text(sku)] += int(units)
        for raw in replies[2 * shard + 1]:
            _id, sku, units, _target = json.loads(text(raw))
            total[sku] += int(units)
    if skus is not None:
        return {sku: total[sku] for sku in skus}
    return dict(total)


async def store_stock(client: AnyRedis, stock: dict[str, int], shards: int) -> None:
    """Set each SKU's units (not add), spread over the shards; one pipeline."""
    if not stock:
        return
    parts: dict[int, dict[str, int]] = defaultdict(dict)
    for sku, units in stock.items():
        for shard, share in enumerate(split(units, shards)):
            parts[shard][sku] = share
    async with client.pipeline(transaction=False) as pipe:
        for shard, mapping in parts.items():
            pipe.hset(stock_key(shard), mapping=mapping)  # type: ignore[arg-type]
        await pipe.execute()


class ReserveStep:
    """``validated → reserved``, or ``rejected`` with ``out_of_stock`` when any item is short."""

    name = "reserve"

    def __init__(self, client: AnyRedis, scripts: Scripts, shards: int) -> None:
        self._redis = client
        self._scripts = scripts
        self._shards = shards

    async def run(self, batch: Sequence[OrderContext]) -> None:
        """Reserve every order's items; short shards borrow from others, then try once more."""
        results = await reserve(self._redis, self._scripts, batch, shards=self._shards)
        short = [i for i, result in enumerate(results) if result.startswith("short:")]
        if short:
            wanted: Counter[tuple[int, str]] = Counter()
            for i in short:
                for sku, units in shortfalls(results[i]).items():
                    wanted[(batch[i].shard, sku)] += units
            if await rebalance(self._redis, self._scripts, dict(wanted), shards=self._shards):
                again = await reserve(
                    self._redis, self._scripts, [batch[i] for i in short], shards=self._shards
                )
                for i, result in zip(short, again, strict=True):
                    results[i] = result
        for ctx, result in zip(batch, results, strict=True):
            if result in {"reserved", "held"}:
                ctx.advance("reserved")
            elif result.startswith("short:"):
                ctx.reject(OUT_OF_STOCK)
            else:
                # 'released'/'terminal': another consumer ended the order meanwhile;
                # leave the entry pending, its redelivery finds the final state.
                ctx.stale = True


@register("reserve")
def _reserve(deps: StepDeps) -> Step:
    return ReserveStep(deps.redis, deps.scripts, deps.config.shards)
