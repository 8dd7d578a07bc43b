"""Redis keys and group names the pipeline owns (besides the contract's in schemas.names).

Operators' scripts and the orders API read these, so they live in one place.
``PIPELINE_GROUP`` is shared by every worker process of a deployment; it
belongs in ``schemas.names`` once the contract gets a v1 addendum.
"""

from __future__ import annotations

from typing import Final

PIPELINE_GROUP: Final = "pipeline"
EVENTS_STREAM: Final = "orders:events"
EVENTS_MAXLEN: Final = 1_000_000
CATALOG_KEY: Final = "pipeline:catalog"  # hash sku -> unit price (minor units)
CATALOG_META_KEY: Final = "pipeline:catalog:meta"  # hash: currency, loaded_at
STOCK_KEY: Final = "pipeline:stock"  # hash sku -> units on hand
TERMINAL_STATUSES: Final = frozenset({"rejected", "failed", "fulfilled"})


def order_key(order_id: str) -> str:
    """``order:{order_id}``: the order's record (a hash)."""
    return f"order:{order_id}"


def history_key(order_id: str) -> str:
    """``order:{order_id}:history``: its transitions, oldest first (a list of JSON)."""
    return f"order:{order_id}:history"


def reservation_key(order_id: str) -> str:
    """``order:{order_id}:reservation``: the stock it holds (a hash sku -> qty, ``_state``)."""
    return f"order:{order_id}:reservation"


def device_index_key(device_id: str) -> str:
    """``device:{device_id}:orders``: the device's orders by seq (a lex-ordered zset)."""
    return f"device:{device_id}:orders"


def replayed_key(dlq_entry_id: str) -> str:
    """``pipeline:dlq:replayed:{entry_id}``: set once a DLQ entry was re-driven."""
    return f"pipeline:dlq:replayed:{dlq_entry_id}"
