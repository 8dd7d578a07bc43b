"""The pipeline's trace hooks: which order contexts a batch's spans belong to.

The stream field ``trace`` (the order's W3C traceparent, written by the bridge)
is the parent of each order's step and status-publish spans. The generators
here are consumed only while tracing is on (servicekit.tracing), so tracing
off costs one generator per batch step and nothing per order; on, only the
sampled orders get attributes built (and their traceparent validated).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Final

from schemas import Status
from schemas.names import TRACE_STREAM_FIELD

from .records import OrderContext

OrderSpans = Iterator[tuple[bytes, dict[str, str]]]
_SAMPLED_LAST_DIGITS: Final = frozenset(b"13579bdf")


def sampled_trace(ctx: OrderContext) -> bytes | None:
    """The order's stream field ``trace`` if its sampled flag is set (cheap; validated later)."""
    trace = ctx.entry.fields.get(TRACE_STREAM_FIELD)
    return trace if trace and trace[-1] in _SAMPLED_LAST_DIGITS else None


def step_spans(ctxs: Sequence[OrderContext]) -> OrderSpans:
    """Each sampled order's context and span attributes, after a step ran on ``ctxs``."""
    for ctx in ctxs:
        if (trace := sampled_trace(ctx)) is not None:
            attributes = {"order.id": ctx.order.order_id, "device.id": ctx.order.device_id}
            if ctx.error is not None:
                attributes["error"] = ctx.error
            yield trace, attributes


def status_spans(
    ctxs: Sequence[OrderContext], statuses: Sequence[tuple[str, Status]]
) -> OrderSpans:
    """The contexts of the sampled orders whose statuses were just published."""
    published: dict[str, list[str]] = {}
    for _, status in statuses:
        published.setdefault(status.order_id, []).append(status.status)
    for ctx in ctxs:
        if ctx.order.order_id in published and (trace := sampled_trace(ctx)) is not None:
            yield trace, {"order.id": ctx.order.order_id,
                          "statuses": ",".join(published[ctx.order.order_id])}  # fmt: skip
