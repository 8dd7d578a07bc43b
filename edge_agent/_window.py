"""What the publisher has out: orders awaiting their receipt, packets awaiting their PUBACK."""

from __future__ import annotations

from dataclasses import dataclass, field

from servicekit.tracing import PendingSpans


@dataclass
class Window:
    """The orders sent and not yet answered, and the packet ids of this connection.

    ``receipts``: order_id -> receipt deadline (agent clock, monotonic s), at
    most ``max_inflight`` of them. ``orders``: packet id -> (order_id, its sends
    before this one). ``queries``: packet ids of status queries. ``spans``: each
    order's publish → receipt trace span.
    """

    spans: PendingSpans
    receipts: dict[str, float] = field(default_factory=dict)
    orders: dict[int, tuple[str, int]] = field(default_factory=dict)
    queries: set[int] = field(default_factory=set)

    def reset(self) -> None:
        """A new connection: nothing is out any more."""
        self.receipts.clear()
        self.orders.clear()
        self.queries.clear()
