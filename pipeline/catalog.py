"""The catalog: loaded from a JSON or TOML file into Redis, and the step that validates against it.

File format (JSON has the same shape)::

    currency = "EUR"            # optional: orders in another currency are rejected
    [items.COLA-33]
    price = 150                 # unit price in minor units
    stock = 1000                # units on hand; loading sets it, it is not added

Loading replaces the prices and sets the stock of the listed SKUs (spread over
the shards, :mod:`pipeline.stock`); SKUs not in the file keep their entries.
Load stock while no orders are being processed: a load sets each shard's part.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import msgspec

from schemas import Order
from schemas.messages import Currency
from servicekit.clock import now_ms
from servicekit.redis_clients import text

from ._calls import AnyRedis
from .errors import CatalogError
from .names import CATALOG_KEY, CATALOG_META_KEY
from .records import OrderContext
from .steps import Step, StepDeps, register
from .stock import store_stock

UNKNOWN_SKU = "unknown_sku"
PRICE_MISMATCH = "price_mismatch"
CURRENCY_MISMATCH = "currency_mismatch"


class CatalogItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One SKU: unit price in minor units and units on hand."""

    price: Annotated[int, msgspec.Meta(ge=0)]
    stock: Annotated[int, msgspec.Meta(ge=0)] = 0


class Catalog(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A catalog file."""

    items: dict[str, CatalogItem]
    currency: Currency | None = None


def read_catalog(path: Path) -> Catalog:
    """Parse a ``.json`` or ``.toml`` catalog file.

    Raises:
        CatalogError: unreadable file, unknown format or invalid content.
    """
    try:
        raw = path.read_bytes()
        data = tomllib.loads(raw.decode()) if path.suffix == ".toml" else json.loads(raw)
        return msgspec.convert(data, Catalog)
    except (OSError, UnicodeDecodeError, ValueError, msgspec.ValidationError) as exc:
        # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors.
        raise CatalogError("invalid_catalog", f"{path}: {exc}") from exc


async def store_catalog(client: AnyRedis, catalog: Catalog, *, shards: int) -> None:
    """Write prices, then stock levels spread over ``shards`` (one pipeline each).

    Not one transaction: on a cluster the keys live in different slots. A load
    that fails half way is simply repeated.
    """
    async with client.pipeline(transaction=False) as pipe:
        if catalog.items:
            pipe.hset(CATALOG_KEY, mapping={sku: i.price for sku, i in catalog.items.items()})
        pipe.hset(
            CATALOG_META_KEY,
            mapping={"currency": catalog.currency or "", "loaded_at": now_ms(), "shards": shards},
        )
        await pipe.execute()
    await store_stock(client, {sku: i.stock for sku, i in catalog.items.items()}, shards)


class ValidateStep:
    """``received → validated``, or ``rejected``: unknown SKU, price or currency mismatch.

    Its catalog read rides with the batch's load (:class:`pipeline._calls.Rider`):
    the worker has it queued in the load's pipeline, and :meth:`run` uses
    that answer once; it reads on its own only when run without one (a
    one-order retry) or on SKUs the answer does not cover.
    """

    name = "validate"

    def __init__(self, client: AnyRedis) -> None:
        self._redis = client
        self._asked: list[str] = []
        self._ready: tuple[dict[str, int], str] | None = None

    def queue_reads(self, pipe: Any, orders: Sequence[Order]) -> int:
        """Queue the prices of the batch's SKUs and the catalog's currency."""
        self._asked = sorted({item.sku for order in orders for item in order.items})
        self._ready = None
        _queue_catalog(pipe, self._asked)
        return 2

    def take_reads(self, replies: Sequence[Any]) -> None:
        """Keep the catalog's answer for the next :meth:`run`."""
        self._ready = _catalog(self._asked, replies)

    async def run(self, batch: Sequence[OrderContext]) -> None:
        """Check every item against the catalog (read with the load, or in one round trip)."""
        ready, self._ready = self._ready, None
        skus = {item.sku for ctx in batch for item in ctx.order.items}
        if ready is None or not skus <= set(self._asked):
            asked = sorted(skus)
            async with self._redis.pipeline(transaction=False) as pipe:
                _queue_catalog(pipe, asked)
                ready = _catalog(asked, await pipe.execute())
        prices, currency = ready
        for ctx in batch:
            if ctx.status != "received":
                continue
            ctx.advance("validated")
            if currency and ctx.order.currency != currency:
                ctx.reject(CURRENCY_MISMATCH)
            for item in ctx.order.items:
                if item.sku not in prices:
                    ctx.reject(UNKNOWN_SKU)
                    break
                if prices[item.sku] != item.unit_price:
                    ctx.reject(PRICE_MISMATCH)
                    break


def _queue_catalog(pipe: Any, skus: Sequence[str]) -> None:
    pipe.hmget(CATALOG_KEY, skus)
    pipe.hget(CATALOG_META_KEY, "currency")


def _catalog(skus: Sequence[str], replies: Sequence[Any]) -> tuple[dict[str, int], str]:
    """Prices of the SKUs the catalog has, and its currency ("" = any)."""
    prices_raw, currency_raw = replies
    prices = {sku: int(p) for sku, p in zip(skus, prices_raw, strict=True) if p is not None}
    return prices, text(currency_raw) if currency_raw else ""


@register("validate")
def _validate(deps: StepDeps) -> Step:
    return ValidateStep(deps.redis)
