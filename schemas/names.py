"""Every name that crosses a process boundary: MQTT topics and Redis keys (v1).

Devices, the bridge, the pipeline and operators' scripts all depend on these,
so they live in one place and change only by adding a ``v2``. The rules of the
ids inside them (device id, order id, region name) are :mod:`schemas.ids`.
"""

from __future__ import annotations

import zlib
from typing import Final

from .errors import Reason, SchemaError
from .ids import is_device_id

CONTRACT_VERSION: Final = 1
"""The wire contract's version: every message's ``v`` and the topics' ``v1/``."""
TOPIC_PREFIX: Final = "v1/devices/"
# Contract addition (device commands): the one topic every agent listens on for
# commands to the whole fleet; only the pipeline's service account may publish.
FLEET_COMMAND_TOPIC: Final = "v1/fleet/cmd"
ORDERS_TOPIC_FILTER: Final = "v1/devices/+/orders"
DEFAULT_SHARE_GROUP: Final = "bridge"

DLQ_STREAM: Final = "orders:dlq"
# The pipeline's consumer group on every shard stream; operators' scripts read
# its lag, and the bridge trims only below what every group has read.
PIPELINE_GROUP: Final = "pipeline"
DEFAULT_SHARDS: Final = 16
DEDUP_TTL_S: Final = 7 * 24 * 3600

# The deployment manifest (servicekit.layout): one JSON string with the shard
# count, the region names and the contract version ("v" + CONTRACT_VERSION)
# every service must share. One key, so one hash slot on a Redis Cluster.
MANIFEST_KEY: Final = "deployment:manifest"

# Contract additions (tracing): the W3C trace context of an order travels as
# this MQTT 5 user property and as this field of its stream entry.
TRACEPARENT_PROPERTY: Final = "traceparent"
TRACE_STREAM_FIELD: Final = "trace"


def orders_topic(device_id: str) -> str:
    """``v1/devices/{device_id}/orders``: device → cloud."""
    return f"{TOPIC_PREFIX}{device_id}/orders"


def receipts_topic(device_id: str) -> str:
    """``v1/devices/{device_id}/receipts``: bridge → device."""
    return f"{TOPIC_PREFIX}{device_id}/receipts"


def status_topic(device_id: str) -> str:
    """``v1/devices/{device_id}/status``: pipeline → device."""
    return f"{TOPIC_PREFIX}{device_id}/status"


def status_query_topic(device_id: str) -> str:
    """``v1/devices/{device_id}/status-query``: device → cloud (status recovery)."""
    return f"{TOPIC_PREFIX}{device_id}/status-query"


def shared_status_query_subscription(group: str = "pipeline") -> str:
    """The MQTT 5 shared subscription that pipeline replicas split for status queries."""
    return f"$share/{group}/{TOPIC_PREFIX}+/status-query"


def health_topic(device_id: str) -> str:
    """``v1/devices/{device_id}/health``: device → cloud (health and MQTT Will)."""
    return f"{TOPIC_PREFIX}{device_id}/health"


def shared_health_subscription(group: str = "health") -> str:
    """The MQTT 5 shared subscription that health consumers split."""
    return f"$share/{group}/{TOPIC_PREFIX}+/health"


def command_topic(device_id: str) -> str:
    """``v1/devices/{device_id}/cmd``: pipeline → one device (device commands)."""
    return f"{TOPIC_PREFIX}{device_id}/cmd"


def device_topics_filter(device_id: str) -> str:
    """Everything the cloud sends one device: ``v1/devices/{device_id}/+``."""
    return f"{TOPIC_PREFIX}{device_id}/+"


def shared_orders_subscription(group: str = DEFAULT_SHARE_GROUP) -> str:
    """The MQTT 5 shared subscription that bridge replicas split."""
    return f"$share/{group}/{ORDERS_TOPIC_FILTER}"


def device_id_from_orders_topic(topic: str) -> str:
    """Return ``{device_id}`` of ``v1/devices/{device_id}/orders``.

    Raises:
        SchemaError: reason ``bad_topic`` for any other topic.
    """
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != "v1" or parts[1] != "devices" or parts[3] != "orders":
        raise SchemaError(Reason.BAD_TOPIC, f"not an orders topic: {topic!r}")
    if not parts[2]:
        raise SchemaError(Reason.BAD_TOPIC, "empty device_id in topic")
    return parts[2]


def shard_of(device_id: str, shards: int) -> int:
    """``crc32(device_id) % shards``: the shard that holds a device's orders."""
    return zlib.crc32(device_id.encode()) % shards


def stream_key(shard: int) -> str:
    """``orders:{N}``; the braces are a Redis Cluster hash tag."""
    return f"orders:{{{shard}}}"


def seen_key(shard: int, device_id: str, order_id: str) -> str:
    """``orders:{N}:seen:{device_id}:{order_id}``: the dedup marker."""
    return f"orders:{{{shard}}}:seen:{device_id}:{order_id}"


def _device_of(topic: str, leaf: str) -> str | None:
    parts = topic.split("/")
    if len(parts) != 4 or parts[:2] != ["v1", "devices"] or parts[3] != leaf:
        return None
    return parts[2] if is_device_id(parts[2]) else None


def device_of_health_topic(topic: str) -> str | None:
    """``{device_id}`` of ``v1/devices/{device_id}/health``; None for any other topic."""
    return _device_of(topic, "health")


def device_of_status_query_topic(topic: str) -> str | None:
    """``{device_id}`` of ``v1/devices/{device_id}/status-query``; None for any other topic."""
    return _device_of(topic, "status-query")


# The bridge replicas' heartbeats (bridge.heartbeat writes them, the orders API's
# ops page reads them). Replicas by last beat (ms), a zset of client ids:
BRIDGES_KEY: Final = "ops:bridges"


def bridge_key(client_id: str) -> str:
    """``ops:bridge:{client_id}``: one replica's last heartbeat (a hash with a TTL).

    Fields: ``ready`` and ``redis_durable`` (1 or 0), ``at`` and ``interval_ms``
    (ms), ``in_flight`` (orders), ``failing`` (the failing checks, comma-separated).
    """
    return f"ops:bridge:{client_id}"
