"""The v1 wire contract in code: messages, codec, names and reason codes."""

from .codec import (
    build_order,
    decode_command,
    decode_health,
    decode_order,
    decode_receipt,
    decode_status,
    decode_status_query,
    decode_stored_order,
    encode,
)
from .errors import DecodeError, Reason, SchemaError
from .messages import (
    MAX_ORDER_BYTES,
    RETRY_HELD,
    Command,
    Health,
    Item,
    Order,
    Receipt,
    Status,
    StatusQuery,
)

__all__ = [
    "MAX_ORDER_BYTES",
    "RETRY_HELD",
    "Command",
    "DecodeError",
    "Health",
    "Item",
    "Order",
    "Reason",
    "Receipt",
    "SchemaError",
    "Status",
    "StatusQuery",
    "build_order",
    "decode_command",
    "decode_health",
    "decode_order",
    "decode_receipt",
    "decode_status",
    "decode_status_query",
    "decode_stored_order",
    "encode",
]
