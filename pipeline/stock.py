"""The stock reservation step: all items of an order at once, atomically, once per order.

An order is a ``(device_id, order_id)`` pair: ids are unique per device only.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import redis.asyncio as aioredis

from ._lua import Scripts
from .names import STOCK_KEY, order_key, reservation_key
from .records import OrderContext, text
from .steps import Step, StepDeps, register

OUT_OF_STOCK = "out_of_stock"


async def reserve(
    client: aioredis.Redis, scripts: Scripts, batch: Sequence[OrderContext]
) -> list[str]:
    """Reserve each order's lines, in batch order, in one script call.

    Returns one result per order: ``reserved`` (now), ``held`` (earlier),
    ``released``, ``terminal`` or ``short:<sku>``.
    """
    rows = [
        (
            reservation_key(ctx.order.device_id, ctx.order.order_id),
            order_key(ctx.order.device_id, ctx.order.order_id),
            [v for item in ctx.order.items for v in (item.sku, str(item.qty))],
        )
        for ctx in batch
    ]
    replies = await scripts.run(client, "reserve", [STOCK_KEY], [msgspec.json.encode(rows)])
    return [text(r) for r in replies]


class ReserveStep:
    """``validated → reserved``, or ``rejected`` with ``out_of_stock`` when any item is short."""

    name = "reserve"

    def __init__(self, client: aioredis.Redis, scripts: Scripts) -> None:
        self._redis = client
        self._scripts = scripts

    async def run(self, batch: Sequence[OrderContext]) -> None:
        """Reserve every order's items; redelivered orders find their reservation held."""
        for ctx, result in zip(
            batch, await reserve(self._redis, self._scripts, batch), strict=True
        ):
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
    return ReserveStep(deps.redis, deps.scripts)
