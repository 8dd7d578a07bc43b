"""Redis keys the pipeline owns (its consumer group name is ``schemas.names.PIPELINE_GROUP``).

Operators' scripts and the orders API read these, so they live in one place.

Every key of an order carries its shard's Redis Cluster hash tag ``{N}``
(``N = crc32(device_id) % shards``, the bridge's shard of the device): the
order's record, its device's index, its order-id index entry, the shard's
events stream, stock, retention index and stock transfers all live in the slot
of ``orders:{N}``. One script call per shard of a batch therefore touches one
slot, on a single Redis and on a cluster alike. The catalog (prices) is one
key read on its own; the pipeline DLQ ``pipeline:dlq`` (contract) keeps its
name, and its markers carry the tag ``{pipeline:dlq}`` (same slot).
"""

from __future__ import annotations

from typing import Final

from schemas.names import shard_of

# Entries across all shards' events streams together; an entry lists one commit's
# orders of a shard (1 to ~100), so this keeps the events of the last 30,000 to
# ~3,000,000 orders, at most ~0.4 GB (~134 B per order).
EVENTS_MAXLEN: Final = 30_000
CATALOG_KEY: Final = "pipeline:catalog"  # hash sku -> unit price (minor units)
CATALOG_META_KEY: Final = "pipeline:catalog:meta"  # hash: currency, loaded_at
# Dead letters of accepted orders: never trimmed; only replay or an operator's resolve
# empties it. (The bridge's intake DLQ, schemas.names.DLQ_STREAM, keeps its cap.)
PIPELINE_DLQ_STREAM: Final = "pipeline:dlq"
# A key ending in this tag hashes to the slot of `pipeline:dlq` (Redis hashes only
# the text inside the first {...}, and "pipeline:dlq" untagged hashes the same).
DLQ_TAG: Final = "{pipeline:dlq}"
# How long a replayed DLQ entry's marker answers "already replayed", and how long
# a dead letter's marker keeps a redelivered entry from being dead-lettered twice.
REPLAYED_MARKER_TTL_S: Final = 30 * 24 * 3600
TERMINAL_STATUSES: Final = frozenset({"rejected", "failed", "fulfilled"})
# Before the cluster layout (docs/how-to/upgrade.md): one stock hash, one events
# stream, one retention index, untagged per-order keys.
LEGACY_STOCK_KEY: Final = "pipeline:stock"
LEGACY_EVENTS_STREAM: Final = "orders:events"


def tag(device_id: str, shards: int) -> str:
    """``{N}``: the hash tag of the device's shard."""
    return f"{{{shard_of(device_id, shards)}}}"


def shard_tag(shard: int) -> str:
    """``{N}`` for shard N."""
    return f"{{{shard}}}"


def order_key(device_id: str, order_id: str, shards: int) -> str:
    """``order:{N}:{device_id}:{order_id}``: the order's record (a hash).

    Holds the order's fixed fields, its status, the steps it passed (``steps``), its
    history (``h:1`` … ``h:{hn}``: ``[status, step, reason, at]``) and the stock it holds
    (``res`` = held/released, ``res:{sku}`` = units). Order ids are unique per
    device only (the contract), so the key carries both; neither id may contain
    ``:`` or braces, so keys cannot collide.
    """
    return f"order:{tag(device_id, shards)}:{device_id}:{order_id}"


def order_key_in(shard: int, device_id: str, order_id: str) -> str:
    """:func:`order_key` when the device's shard is already known."""
    return f"order:{{{shard}}}:{device_id}:{order_id}"


def device_index_key_in(shard: int, device_id: str) -> str:
    """:func:`device_index_key` when the device's shard is already known."""
    return f"device:{{{shard}}}:{device_id}:orders"


def order_devices_key(order_id: str, shard: int) -> str:
    """``order-id:{N}:{order_id}:devices``: shard N's devices with an order of this id (a set).

    Lets ``GET /v1/orders/{order_id}`` find an order without its device (it asks every shard).
    """
    return f"order-id:{shard_tag(shard)}:{order_id}:devices"


def device_index_key(device_id: str, shards: int) -> str:
    """``device:{N}:{device_id}:orders``: the device's orders by seq (a lex-ordered zset)."""
    return f"device:{tag(device_id, shards)}:{device_id}:orders"


def events_key(shard: int) -> str:
    """``orders:{N}:events``: one entry per commit, listing the orders it moved (capped)."""
    return f"orders:{shard_tag(shard)}:events"


def events_maxlen(shards: int) -> int:
    """Each shard's events cap: :data:`EVENTS_MAXLEN` shared out."""
    return max(100, EVENTS_MAXLEN // max(1, shards))


def stock_key(shard: int) -> str:
    """``pipeline:{N}:stock``: shard N's part of the stock (hash sku -> units on hand)."""
    return f"pipeline:{shard_tag(shard)}:stock"


def transfers_key(shard: int) -> str:
    """``pipeline:{N}:transfers``: stock moving out of shard N (zset of transfers, by time)."""
    return f"pipeline:{shard_tag(shard)}:transfers"


def transfer_in_key(shard: int, transfer_id: str) -> str:
    """``pipeline:{N}:transfer-in:{id}``: set once shard N received that transfer."""
    return f"pipeline:{shard_tag(shard)}:transfer-in:{transfer_id}"


def retention_key(shard: int) -> str:
    """``pipeline:{N}:retention``: shard N's terminal orders by when their retention ends."""
    return f"pipeline:{shard_tag(shard)}:retention"


def replayed_key(dlq_entry_id: str) -> str:
    """``pipeline:dlq:replayed:{entry_id}{pipeline:dlq}``: set once a DLQ entry was re-driven."""
    return f"pipeline:dlq:replayed:{dlq_entry_id}{DLQ_TAG}"


def legacy_replayed_key(dlq_entry_id: str) -> str:
    """The replayed marker before the cluster layout (still honoured)."""
    return f"pipeline:dlq:replayed:{dlq_entry_id}"


def letter_key(shard: str, entry_id: str) -> str:
    """``pipeline:dlq:letter:{shard}:{entry_id}{pipeline:dlq}``: that entry is dead-lettered.

    Makes dead-lettering idempotent: the DLQ append and the source XACK are two
    slots on a cluster, and an entry redelivered between them is not added twice.
    """
    return f"pipeline:dlq:letter:{shard}:{entry_id}{DLQ_TAG}"


# Fleet health (pipeline/health.py writes them, the /ops page reads them); see the
# docs/explanation/observability.md. Devices by last seen (consumer clock, ms), a zset:
HEALTH_DEVICES_KEY: Final = "health:devices"
# Devices by their oldest unreceipted order's age in ms (0: none, or offline), a zset:
HEALTH_OLDEST_KEY: Final = "health:oldest"


def health_device_key(device_id: str) -> str:
    """``health:device:{device_id}``: the device's last health figures (a hash with a TTL)."""
    return f"health:device:{device_id}"
