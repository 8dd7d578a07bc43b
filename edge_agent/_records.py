"""Records the outbox stores and hands out: order states, submissions, state updates."""

from __future__ import annotations

from typing import Final, NamedTuple

import msgspec

# The pipeline's terminal statuses: schemas.OrderStatus without "confirmed".
TERMINAL_STATUSES: Final = frozenset({"rejected", "failed", "fulfilled"})


class OrderRecord(msgspec.Struct, frozen=True):
    """An order's local state, as ``GET /v1/orders/{id}`` shows it."""

    order_id: str
    seq: int
    state: str
    status: str | None
    reason: str | None
    # Times handed to the broker. The HTTP answer keeps its v1 key `attempts`
    # (the column's name too); on the wire `attempts` is the geo region list.
    sends: int = msgspec.field(name="attempts")
    created_ms: int
    updated_ms: int
    settled_ms: int | None
    # Geo mode: the regions the order was published to, first = its authority.
    regions: tuple[str, ...] = ()


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
    sends: int = 0  # sends so far: the exponent of a transient refusal's backoff
    regions: str = ""  # geo: the order's `attempts` so far, comma-separated (committed)
    traceparent: str | None = None  # W3C trace context set at intake (servicekit.tracing)


class NewOrder(NamedTuple):
    """An order to store: its id, the ``seq`` reserved for it, and the encoded wire payload."""

    order_id: str
    seq: int
    payload: bytes
    traceparent: str | None = None  # W3C trace context set at intake (servicekit.tracing)


class Sent(NamedTuple):
    """The order was handed to the broker; expect a receipt before ``retry_at_ms``.

    Both times are agent-clock ms (``edge_agent/_clock.py``).
    """

    order_id: str
    retry_at_ms: int
    sent_clock_ms: int


class Settle(NamedTuple):
    """A receipt settled the order: no more sending.

    ``query_at_ms`` (agent clock): when to ask for the terminal status of an
    accepted order if it has not come by then; None for no status query.
    """

    order_id: str
    state: str  # accepted | rejected
    reason: str | None
    query_at_ms: int | None = None


class Hold(NamedTuple):
    """The broker refused the order for good (a definitive PUBACK code): keep it, stop sending."""

    order_id: str
    reason: str


class StatusQueried(NamedTuple):
    """A status query went out for these orders; ask again at ``next_at_ms`` (agent clock)."""

    order_ids: tuple[str, ...]
    next_at_ms: tuple[int, ...]


class Defer(NamedTuple):
    """Send again later, e.g. after a ``rate_limited`` receipt."""

    order_id: str
    retry_at_ms: int
    reason: str | None


class StatusUpdate(NamedTuple):
    """A pipeline status for the order; it also proves the cloud has it.

    ``query_at_ms``: None for a terminal status (no more queries), else when
    to ask again if no terminal status came by then (agent clock).
    """

    order_id: str
    status: str
    reason: str | None
    query_at_ms: int | None = None


Update = Sent | Settle | Defer | StatusUpdate | Hold | StatusQueried


class RetryResult(msgspec.Struct, frozen=True):
    """What ``edge-agent retry`` did: re-queued, refused as past the dedup horizon, not held."""

    requeued: list[str]
    past_horizon: list[str]
    not_held: list[str]


class Stats(NamedTuple):
    """Outbox figures for health and metrics."""

    pending_rows: int
    pending_bytes: int
    oldest_pending_ms: int | None
    total_rows: int
    awaiting_status: int = 0
    awaiting_authority: int = 0  # geo: last answer was `pending` (either reason)
    awaiting_unknown_region: int = 0  # of those, `pending` because a bridge lacks the region
