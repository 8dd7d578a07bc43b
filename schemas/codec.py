"""MessagePack encode/decode for the v1 messages.

One msgspec Decoder per message type, built once. Every failure to decode is
translated into :class:`schemas.DecodeError` with a reason code; nothing else
escapes, whatever the bytes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Final, TypeVar, get_args, get_origin

import msgspec

from .errors import DecodeError, Reason, SchemaError
from .messages import MAX_ORDER_BYTES, Command, Health, Order, Receipt, Status, StatusQuery

_T = TypeVar("_T", Order, Receipt, Status, StatusQuery, Health, Command)
Payload = bytes | bytearray | memoryview

_encoder: Final = msgspec.msgpack.Encoder()
_order_decoder: Final = msgspec.msgpack.Decoder(Order)
_receipt_decoder: Final = msgspec.msgpack.Decoder(Receipt)
_status_decoder: Final = msgspec.msgpack.Decoder(Status)
_status_query_decoder: Final = msgspec.msgpack.Decoder(StatusQuery)
_health_decoder: Final = msgspec.msgpack.Decoder(Health)
_command_decoder: Final = msgspec.msgpack.Decoder(Command)


def _unconstrained(tp: Any) -> Any:
    """``tp`` without its ``Annotated`` constraints (patterns, lengths, bounds); a
    nested Struct such as :class:`Item` keeps its own."""
    if get_origin(tp) is Annotated:
        return _unconstrained(get_args(tp)[0])
    origin = get_origin(tp)
    if origin in (tuple, dict):
        return origin[tuple(a if a is Ellipsis else _unconstrained(a) for a in get_args(tp))]
    return tp


def _stored_order_type() -> type[msgspec.Struct]:
    """Order's fields (built from Order, so it cannot drift), its top-level constraints left out."""
    spec: list[Any] = []
    for f in msgspec.structs.fields(Order):
        if f.required:
            spec.append((f.name, _unconstrained(f.type)))
        elif f.default_factory is not msgspec.NODEFAULT:
            spec.append((f.name, _unconstrained(f.type),
                         msgspec.field(default_factory=f.default_factory)))  # fmt: skip
        else:
            spec.append((f.name, _unconstrained(f.type), f.default))
    return msgspec.defstruct("StoredOrder", spec, frozen=True)


_stored_order_decoder: Final = msgspec.msgpack.Decoder(_stored_order_type())

# msgspec ends validation messages with " - at `$.items[0].qty`".
_PATH_RE: Final = re.compile(r" - at `(?P<path>[^`]*)`\Z")


def encode(message: Order | Receipt | Status | StatusQuery | Health | Command) -> bytes:
    """Encode a message to MessagePack.

    Raises:
        SchemaError: reason ``too_large`` if an order encodes past 16 KiB,
            ``invalid_schema`` if an integer is outside MessagePack's range.
    """
    try:
        data = _encoder.encode(message)
    except OverflowError as exc:
        # MessagePack carries integers in -2**63 .. 2**64-1 only; a bigger one
        # is bad input, not a crash.
        raise SchemaError(Reason.INVALID_SCHEMA, f"an integer is out of range: {exc}") from exc
    if isinstance(message, Order) and len(data) > MAX_ORDER_BYTES:
        raise SchemaError(
            Reason.TOO_LARGE, f"order encodes to {len(data)} bytes, cap is {MAX_ORDER_BYTES}"
        )
    return data


def decode_order(payload: Payload, *, topic_device_id: str | None = None) -> Order:
    """Decode and validate an order.

    Args:
        payload: the raw MQTT payload.
        topic_device_id: the ``{device_id}`` of the topic it arrived on; when
            given, the payload's ``device_id`` must equal it.

    Raises:
        DecodeError: with reason ``too_large``, ``malformed``,
            ``unsupported_version``, ``invalid_schema``, ``total_mismatch`` or
            ``device_mismatch``.
    """
    _check_size(payload)
    order = _decode(_order_decoder, payload)
    return _check_device(order, topic_device_id)


def _check_size(payload: Payload) -> None:
    if len(payload) > MAX_ORDER_BYTES:
        raise DecodeError(
            Reason.TOO_LARGE, f"payload is {len(payload)} bytes, cap is {MAX_ORDER_BYTES}"
        )


def _check_device(order: Order, topic_device_id: str | None) -> Order:
    if topic_device_id is not None and order.device_id != topic_device_id:
        raise DecodeError(
            Reason.DEVICE_MISMATCH,
            f"payload device_id {order.device_id!r} does not match topic {topic_device_id!r}",
            field="$.device_id",
        )
    return order


def decode_stored_order(payload: Payload, *, topic_device_id: str | None = None) -> Order:
    """Decode an order a bridge validated with :func:`decode_order` (an ``orders:{N}``
    stream entry's payload, ARCHITECTURE.md): about half its cost.

    The shape and types are checked, and so are the lines (:class:`Item`), the total
    (``Order.__post_init__``) and the device; the top-level strings' patterns and
    lengths, which the bridge checked, are not (most of :func:`decode_order`'s time
    is those regular expressions). Same errors as :func:`decode_order`.
    """
    _check_size(payload)
    stored = _decode(_stored_order_decoder, payload)  # type: ignore[type-var]
    try:
        order = Order(*msgspec.structs.astuple(stored))
    except ValueError as exc:  # __post_init__: the total
        raise DecodeError(Reason.TOTAL_MISMATCH, str(exc), field="$.total") from exc
    return _check_device(order, topic_device_id)


def build_order(data: Mapping[str, Any]) -> Order:
    """Validate plain Python data (say, parsed JSON) into an :class:`Order`.

    Same rules and reason codes as :func:`decode_order`, and the same size cap.

    Raises:
        DecodeError: the data breaks a contract rule.
    """
    try:
        order = msgspec.convert(data, Order)
    except msgspec.ValidationError as exc:
        raise _validation_error(str(exc)) from exc
    try:
        encode(order)
    except SchemaError as exc:
        raise DecodeError(exc.reason, exc.detail) from exc
    return order


def decode_receipt(payload: Payload) -> Receipt:
    """Decode a receipt. Raises :class:`DecodeError`."""
    return _decode(_receipt_decoder, payload)


def decode_status(payload: Payload) -> Status:
    """Decode a status message. Raises :class:`DecodeError`."""
    return _decode(_status_decoder, payload)


def decode_status_query(payload: Payload) -> StatusQuery:
    """Decode a status query. Raises :class:`DecodeError`."""
    return _decode(_status_query_decoder, payload)


def decode_health(payload: Payload) -> Health:
    """Decode a device health message (or Will). Raises :class:`DecodeError`."""
    return _decode(_health_decoder, payload)


def decode_command(payload: Payload) -> Command:
    """Decode a device command. Raises :class:`DecodeError`."""
    return _decode(_command_decoder, payload)


def _decode(decoder: msgspec.msgpack.Decoder[_T], payload: Payload) -> _T:
    try:
        return decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise _validation_error(str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise DecodeError(Reason.MALFORMED, str(exc)) from exc
    except (ValueError, TypeError, RecursionError) as exc:
        # Defensive: msgspec documents only DecodeError, but a crafted payload
        # must never escape as anything but our typed error.
        raise DecodeError(Reason.MALFORMED, repr(exc)) from exc


def _validation_error(message: str) -> DecodeError:
    match = _PATH_RE.search(message)
    path = match.group("path") if match else "$"
    detail = message[: match.start()] if match else message
    if path == "$" and detail.startswith("Expected `object`"):
        return DecodeError(Reason.MALFORMED, detail, field=path)
    if path == "$.v":
        return DecodeError(Reason.UNSUPPORTED_VERSION, detail, field=path)
    if detail.startswith("total "):
        return DecodeError(Reason.TOTAL_MISMATCH, detail, field="$.total")
    return DecodeError(Reason.INVALID_SCHEMA, detail, field=path)
