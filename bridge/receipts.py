"""Receipts: the bridge's answer to every message, on ``v1/devices/{id}/receipts``."""

from __future__ import annotations

from schemas import Receipt, encode
from schemas.messages import ReceiptResult


def receipt_bytes(
    order_id: str | None, result: ReceiptResult, reason: str | None, at_ms: int
) -> bytes:
    """The encoded receipt."""
    return encode(Receipt(v=1, order_id=order_id, result=result, reason=reason, at=at_ms))
