"""Errors raised by the v1 wire contract.

Hierarchy::

    SchemaError            root; carries a machine-readable ``reason`` code
    └── DecodeError        bytes could not be turned into a valid message

Every reason code is one of the ``Reason`` constants below. They are sent to
devices in receipts and stored with DLQ entries, so they are part of the
contract: add new ones, never rename.
"""

from __future__ import annotations

from typing import Final


class Reason:
    """Reason codes carried by errors, receipts and DLQ entries."""

    MALFORMED: Final = "malformed"  # not MessagePack, or not a map
    UNSUPPORTED_VERSION: Final = "unsupported_version"  # `v` is not 1
    INVALID_SCHEMA: Final = "invalid_schema"  # a field breaks a contract rule
    TOTAL_MISMATCH: Final = "total_mismatch"  # total != sum(qty * unit_price)
    TOO_LARGE: Final = "too_large"  # payload over the 16 KiB cap
    DEVICE_MISMATCH: Final = "device_mismatch"  # payload device_id != topic's
    BAD_TOPIC: Final = "bad_topic"  # topic is not v1/devices/{id}/orders
    CONFLICT: Final = "conflict"  # order_id reused with another payload
    RATE_LIMITED: Final = "rate_limited"  # device over its rate limit
    AUTHORITY_UNREACHABLE: Final = "authority_unreachable"  # geo: `pending` receipt
    UNKNOWN_REGION: Final = "unknown_region"  # geo: attempts[0] names no configured region


class SchemaError(Exception):
    """Root of the ``schemas`` errors.

    Attributes:
        reason: machine-readable code, one of :class:`Reason`.
        field: JSON path of the offending field (``$.items[0].qty``) or None.
        detail: human-readable explanation.
    """

    def __init__(self, reason: str, detail: str, field: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.field = field


class DecodeError(SchemaError):
    """Bytes from the wire are not a valid message of the expected type."""
