"""Redis keys the pipeline owns (its consumer group name is ``schemas.names.PIPELINE_GROUP``).

Operators' scripts and the orders API read these, so they live in one place.
"""

from __future__ import annotations

from typing import Final

EVENTS_STREAM: Final = "orders:events"
EVENTS_MAXLEN: Final = 1_000_000
CATALOG_KEY: Final = "pipeline:catalog"  # hash sku -> unit price (minor units)
CATALOG_META_KEY: Final = "pipeline:catalog:meta"  # hash: currency, loaded_at
STOCK_KEY: Final = "pipeline:stock"  # hash sku -> units on hand
# Dead letters of accepted orders: never trimmed; only replay or an operator's resolve
# empties it. (The bridge's intake DLQ, schemas.names.DLQ_STREAM, keeps its cap.)
PIPELINE_DLQ_STREAM: Final = "pipeline:dlq"
# Terminal orders by the time their retention ends (a zset), so the worker can drop
# their members from the device and order-id indexes once their keys expired.
RETENTION_KEY: Final = "pipeline:retention"
# How long a replayed DLQ entry's marker answers "already replayed".
REPLAYED_MARKER_TTL_S: Final = 30 * 24 * 3600
TERMINAL_STATUSES: Final = frozenset({"rejected", "failed", "fulfilled"})


def order_key(device_id: str, order_id: str) -> str:
    """``order:{device_id}:{order_id}``: the order's record (a hash).

    Order ids are unique per device only (the contract), so every per-order key
    carries both. Neither id may contain ``:``, so the keys cannot collide.
    """
    return f"order:{device_id}:{order_id}"


def history_key(device_id: str, order_id: str) -> str:
    """``order:{device_id}:{order_id}:history``: its transitions, oldest first (JSON list)."""
    return f"order:{device_id}:{order_id}:history"


def reservation_key(device_id: str, order_id: str) -> str:
    """``order:{device_id}:{order_id}:reservation``: stock it holds (sku -> qty, ``_state``)."""
    return f"order:{device_id}:{order_id}:reservation"


def order_devices_key(order_id: str) -> str:
    """``order-id:{order_id}:devices``: the devices that have an order with this id (a set).

    Lets ``GET /v1/orders/{order_id}`` find an order without its device.
    """
    return f"order-id:{order_id}:devices"


def device_index_key(device_id: str) -> str:
    """``device:{device_id}:orders``: the device's orders by seq (a lex-ordered zset)."""
    return f"device:{device_id}:orders"


def replayed_key(dlq_entry_id: str) -> str:
    """``pipeline:dlq:replayed:{entry_id}``: set once a DLQ entry was re-driven."""
    return f"pipeline:dlq:replayed:{dlq_entry_id}"


# Fleet health (pipeline/health.py writes them, the /ops page reads them); see the
# README's design notes. Devices by last seen (consumer clock, ms), a zset:
HEALTH_DEVICES_KEY: Final = "health:devices"
# Devices by their oldest unreceipted order's age in ms (0: none, or offline), a zset:
HEALTH_OLDEST_KEY: Final = "health:oldest"


def health_device_key(device_id: str) -> str:
    """``health:device:{device_id}``: the device's last health figures (a hash with a TTL)."""
    return f"health:device:{device_id}"
