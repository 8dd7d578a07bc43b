"""The v1 wire contract in code: messages, codec, names and reason codes."""

from .codec import build_order, decode_order, decode_receipt, decode_status, encode
from .errors import DecodeError, Reason, SchemaError
from .messages import MAX_ORDER_BYTES, Item, Order, Receipt, Status

__all__ = [
    "MAX_ORDER_BYTES",
    "DecodeError",
    "Item",
    "Order",
    "Reason",
    "Receipt",
    "SchemaError",
    "Status",
    "build_order",
    "decode_order",
    "decode_receipt",
    "decode_status",
    "encode",
]
