"""Turn one MQTT message into either a valid order for its shard or a dead letter.

Pure functions, no I/O: the batcher writes what they return.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

import msgspec

from schemas import MAX_ORDER_BYTES, DecodeError, SchemaError, decode_order
from schemas.messages import OrderId
from schemas.names import device_id_from_orders_topic, shard_of


@dataclass(frozen=True, slots=True)
class ValidOrder:
    """A validated order, ready for the atomic dedup + append into its shard."""

    shard: int
    device_id: str
    order_id: str
    seq: int
    received_at_ms: int
    payload: bytes
    digest: str  # hash of the payload without `attempts`: the dedup marker's value
    # Geo mode: the order's authority region (``attempts[0]``); None when it names none.
    authority: str | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that goes to ``orders:dlq`` with its reason."""

    reason: str
    topic: str
    payload: bytes
    received_at_ms: int
    device_id: str | None  # from the topic; None when the topic itself is bad
    order_id: str | None  # best effort, for the receipt; None when unparseable


Classified = ValidOrder | DeadLetter


class _OrderIdHint(msgspec.Struct):
    """Just enough of an order to name it in a receipt."""

    order_id: OrderId | None = None


_hint_decoder: Final = msgspec.msgpack.Decoder(_OrderIdHint)
# Every top-level value kept as its exact bytes, so dropping one key changes nothing else.
_fields_decoder: Final = msgspec.msgpack.Decoder(dict[str, msgspec.Raw])
_fields_encoder: Final = msgspec.msgpack.Encoder()
ATTEMPTS_KEY: Final = "attempts"


def payload_digest(payload: bytes) -> str:
    """The dedup marker's value: a 128-bit hash of the payload without ``attempts``.

    ``attempts`` grows when a device resends an order to another region (GEO.md),
    so it must not count as other content: a resend is a ``duplicate``, not a
    ``conflict``. A payload without the key is hashed as it came, byte for byte
    (markers written before geo mode still match); one with it is hashed with
    that key cut out of the map and every other key and value kept as sent.
    """
    if ATTEMPTS_KEY.encode() in payload:
        try:
            fields = _fields_decoder.decode(payload)
        except msgspec.DecodeError:
            fields = {}
        if fields.pop(ATTEMPTS_KEY, None) is not None:
            payload = _fields_encoder.encode(fields)
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


def order_id_hint(payload: bytes) -> str | None:
    """The payload's ``order_id`` if it has a valid one, else None. Never raises."""
    try:
        return _hint_decoder.decode(payload).order_id
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError):
        return None


def classify(topic: str, payload: bytes, *, shards: int, received_at_ms: int) -> Classified:
    """Validate one message against the v1 contract and route it."""
    try:
        device_id = device_id_from_orders_topic(topic)
    except SchemaError as exc:
        return DeadLetter(exc.reason, topic, payload, received_at_ms, None, None)
    try:
        order = decode_order(payload, topic_device_id=device_id)
    except DecodeError as exc:
        hint = None if len(payload) > MAX_ORDER_BYTES else order_id_hint(payload)
        return DeadLetter(exc.reason, topic, payload, received_at_ms, device_id, hint)
    return ValidOrder(
        shard=shard_of(device_id, shards),
        device_id=device_id,
        order_id=order.order_id,
        seq=order.seq,
        received_at_ms=received_at_ms,
        payload=payload,
        digest=payload_digest(payload),
        authority=order.attempts[0] if order.attempts else None,
    )
