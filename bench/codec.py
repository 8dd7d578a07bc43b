"""Codec choice: msgspec typed decode+validate vs msgpack + hand-written validation.

Both sides do the full v1 Order check (types, lengths, patterns, bounds, total).
Prints orders/s for each and the ratio; run with `.venv/bin/python bench/codec.py`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import msgpack

from schemas import Item, Order, decode_order, encode

ORDER_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
DEVICE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
CURRENCY = re.compile(r"[A-Z]{3}")


def _int(value: Any, low: int, high: int | None = None) -> int:
    if type(value) is not int or value < low or (high is not None and value > high):
        raise ValueError(value)
    return value


def _str(value: Any, pattern: re.Pattern[str]) -> str:
    if type(value) is not str or not pattern.fullmatch(value):
        raise ValueError(value)
    return value


def decode_with_msgpack(payload: bytes) -> dict[str, Any]:
    """What a careful hand-written validator on top of msgpack does."""
    data = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    if not isinstance(data, dict) or data.get("v") != 1:
        raise ValueError("version")
    _str(data["order_id"], ORDER_ID)
    _str(data["device_id"], DEVICE_ID)
    _int(data["seq"], 0)
    _int(data["created_at"], 0)
    _str(data["currency"], CURRENCY)
    items = data["items"]
    if type(items) is not list or not 1 <= len(items) <= 100:
        raise ValueError("items")
    total = 0
    for item in items:
        sku = item["sku"]
        if type(sku) is not str or not 1 <= len(sku) <= 64:
            raise ValueError("sku")
        total += _int(item["qty"], 1, 1000) * _int(item["unit_price"], 0)
    if _int(data["total"], 0) != total:
        raise ValueError("total")
    attrs = data.get("attrs", {})
    if not isinstance(attrs, dict) or len(attrs) > 32:
        raise ValueError("attrs")
    return data


def rate(fn: Callable[[bytes], object], payload: bytes, seconds: float = 1.0) -> float:
    """Calls per second of fn(payload), best of three runs."""
    best = 0.0
    for _ in range(3):
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            for _ in range(1000):
                fn(payload)
            count += 1000
        best = max(best, count / elapsed)
    return best


def main() -> None:
    """Measure both decoders on a typical 3-item order and print the ratio."""
    items = (Item("COLA-33", 2, 150), Item("CHIPS-SALT", 1, 220), Item("WATER-50", 3, 90))
    order = Order(
        v=1, order_id="01JD3X7Q9Z8ABCDEFGHJKMNPQR", device_id="vending-eu-west-00042",
        seq=1234, created_at=1_763_000_000_000, currency="EUR", items=items,
        total=sum(i.qty * i.unit_price for i in items), attrs={"slot": "B4"},
    )  # fmt: skip
    payload = encode(order)
    assert decode_with_msgpack(payload)["total"] == order.total
    msgspec_rate = rate(decode_order, payload)
    msgpack_rate = rate(decode_with_msgpack, payload)
    print(f"payload: {len(payload)} bytes")
    print(f"msgspec typed decode+validate: {msgspec_rate:>10,.0f} orders/s")
    print(f"msgpack + hand validation:     {msgpack_rate:>10,.0f} orders/s")
    print(f"ratio msgspec/msgpack:         {msgspec_rate / msgpack_rate:>10.2f}x")


if __name__ == "__main__":
    main()
