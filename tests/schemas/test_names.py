"""Topic and key names of the v1 contract."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from redis.crc import key_slot

from schemas import Reason, SchemaError
from schemas.names import (
    FLEET_COMMAND_TOPIC,
    command_topic,
    device_id_from_orders_topic,
    device_of_health_topic,
    device_of_status_query_topic,
    orders_topic,
    receipts_topic,
    seen_key,
    shard_of,
    shared_orders_subscription,
    status_topic,
    stream_key,
)

from .strategies import device_ids, order_ids


def test_topics_follow_the_contract() -> None:
    """The three per-device topics and the bridge's shared subscription."""
    assert orders_topic("k1") == "v1/devices/k1/orders"
    assert receipts_topic("k1") == "v1/devices/k1/receipts"
    assert status_topic("k1") == "v1/devices/k1/status"
    assert shared_orders_subscription("g") == "$share/g/v1/devices/+/orders"
    assert command_topic("k1") == "v1/devices/k1/cmd"
    assert FLEET_COMMAND_TOPIC == "v1/fleet/cmd"


@given(device_ids)
def test_device_id_round_trips_through_the_orders_topic(device_id: str) -> None:
    """Every valid device id is recovered from its orders topic."""
    assert device_id_from_orders_topic(orders_topic(device_id)) == device_id


@pytest.mark.parametrize(
    "topic", ["v1/devices/k1/receipts", "v1/devices//orders", "v2/devices/k1/orders", "x"]
)
def test_other_topics_are_bad_topic(topic: str) -> None:
    """Anything but v1/devices/{id}/orders is refused with bad_topic."""
    with pytest.raises(SchemaError) as caught:
        device_id_from_orders_topic(topic)
    assert caught.value.reason == Reason.BAD_TOPIC


@pytest.mark.parametrize(
    ("name_device", "leaf"),
    [(device_of_health_topic, "health"), (device_of_status_query_topic, "status-query")],
)
def test_only_a_device_topic_with_a_valid_id_names_a_device(
    name_device: Callable[[str], str | None], leaf: str
) -> None:
    """Only ``v1/devices/{valid id}/{leaf}`` yields a device id, matched whole."""
    assert name_device(f"v1/devices/kiosk-7/{leaf}") == "kiosk-7"
    assert name_device(f"v1/devices/kiosk-7/{leaf}\n") is None
    assert name_device(f"v1/devices/a:b/{leaf}") is None
    assert name_device(f"v1/devices//{leaf}") is None
    assert name_device(f"v1/devices/{'k' * 65}/{leaf}") is None
    assert name_device(f"v2/devices/kiosk-7/{leaf}") is None
    assert name_device("v1/devices/kiosk-7/orders") is None


def test_shard_is_crc32_mod_shards() -> None:
    """N = crc32(device_id) % shards, as the contract fixes (crc32('kiosk-1') = 0x6cb80809)."""
    assert shard_of("kiosk-1", 16) == 0x6CB80809 % 16
    assert stream_key(3) == "orders:{3}"
    assert seen_key(3, "k1", "abcdefgh") == "orders:{3}:seen:k1:abcdefgh"


@given(device_ids, order_ids)
def test_stream_and_marker_share_a_cluster_slot(device_id: str, order_id: str) -> None:
    """The hash tag puts a shard's stream and its markers in one Redis Cluster slot."""
    shard = shard_of(device_id, 16)
    assert key_slot(stream_key(shard).encode()) == key_slot(
        seen_key(shard, device_id, order_id).encode()
    )
