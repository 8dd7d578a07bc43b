"""Records the outbox stores and hands out: order states, submissions, state updates."""

from __future__ import annotations

from typing import NamedTuple

import msgspec


class OrderRecord(msgspec.Struct, frozen=True):
    """An order's local state, as ``GET /v1/orders/{id}`` shows it."""

    order_id: str
    seq: int
    state: str
    status: str | None
    reason: str | None
    attempts: int
    created_ms: int
    updated_ms: int
    settled_ms: int | None


class Submitted(msgspec.Struct, frozen=True):
    """The answer to a submission: committed, or the first answer for a duplicate id."""

    order_id: str
    seq: int
    state: str
    duplicate: bool = False


class Due(NamedTuple):
    """An unreceipted order that is due for (re)sending."""

    seq: int
    order_id: str
    payload: bytes


class NewOrder(NamedTuple):
    """An order to store: its id, the ``seq`` reserved for it, and the encoded wire payload."""

    order_id: str
    seq: int
    payload: bytes


class Sent(NamedTuple):
    """The order was handed to the broker; expect a receipt before ``retry_at_ms``."""

    order_id: str
    retry_at_ms: int


class Settle(NamedTuple):
    """A receipt (or a broker rejection) settled the order: no more sending."""

    order_id: str
    state: str  # accepted | rejected
    reason: str | None


class Defer(NamedTuple):
    """Send again later, e.g. after a ``rate_limited`` receipt."""

    order_id: str
    retry_at_ms: int
    reason: str | None


class StatusUpdate(NamedTuple):
    """A pipeline status for the order; it also proves the cloud has it."""

    order_id: str
    status: str
    reason: str | None


Update = Sent | Settle | Defer | StatusUpdate


class Stats(NamedTuple):
    """Outbox figures for health and metrics."""

    pending_rows: int
    pending_bytes: int
    oldest_pending_ms: int | None
    total_rows: int
