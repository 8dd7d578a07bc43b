"""Classification of single messages into valid orders and dead letters."""

from __future__ import annotations

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from bridge.ingest import DeadLetter, ValidOrder, classify, order_id_hint, payload_digest
from schemas import Reason, encode
from schemas.names import orders_topic, shard_of
from tests.helpers import make_order


def test_valid_order_goes_to_its_shard() -> None:
    """A valid order keeps its bytes and lands on crc32(device_id) % shards."""
    payload = encode(make_order("dev-1", 7))
    item = classify(orders_topic("dev-1"), payload, shards=16, received_at_ms=5)
    assert isinstance(item, ValidOrder)
    assert item.shard == shard_of("dev-1", 16)
    assert (item.order_id, item.seq, item.payload) == ("o-dev-1-000007", 7, payload)
    assert item.digest == payload_digest(payload)


def test_spoofed_device_is_dead_lettered_with_its_order_id() -> None:
    """A payload naming another device is device_mismatch, and the receipt can name the order."""
    item = classify(
        orders_topic("dev-1"), encode(make_order("dev-2", 1)), shards=4, received_at_ms=5
    )
    assert isinstance(item, DeadLetter)
    assert (item.reason, item.device_id, item.order_id) == (
        Reason.DEVICE_MISMATCH,
        "dev-1",
        "o-dev-2-000001",
    )


def test_oversized_payload_is_too_large() -> None:
    """Anything over 16 KiB is too_large, whatever it contains."""
    item = classify(orders_topic("d"), b"\x00" * (16 * 1024 + 1), shards=4, received_at_ms=5)
    assert isinstance(item, DeadLetter)
    assert item.reason == Reason.TOO_LARGE


def test_bad_topic_is_dead_lettered_without_device() -> None:
    """A topic that is not an orders topic gives bad_topic and no device to answer."""
    item = classify("v1/devices//orders", encode(make_order("d", 1)), shards=4, received_at_ms=5)
    assert isinstance(item, DeadLetter)
    assert (item.reason, item.device_id) == (Reason.BAD_TOPIC, None)


def test_hint_rejects_invalid_order_ids() -> None:
    """An order_id that breaks the contract is not echoed in a receipt."""
    assert order_id_hint(msgspec.msgpack.encode({"order_id": "short"})) is None
    assert order_id_hint(msgspec.msgpack.encode({"order_id": "long-enough"})) == "long-enough"


@given(st.binary(max_size=512))
def test_any_bytes_classify_without_raising(payload: bytes) -> None:
    """Whatever the bytes, classification returns a typed result and never raises."""
    item = classify(orders_topic("dev"), payload, shards=4, received_at_ms=0)
    assert isinstance(item, ValidOrder | DeadLetter)
    if isinstance(item, DeadLetter):
        assert item.reason in {
            Reason.MALFORMED,
            Reason.INVALID_SCHEMA,
            Reason.UNSUPPORTED_VERSION,
            Reason.TOTAL_MISMATCH,
            Reason.DEVICE_MISMATCH,
        }
