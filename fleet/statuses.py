"""The pipeline's status of each order, for the verifier's ``stuck`` check.

Reads the pipeline's current layout (``order:{order_id}`` hashes with
``status`` and ``device_id``); an order whose record names another device is
reported as having no status. When ``pipeline.order_statuses`` (records keyed
by ``(device_id, order_id)``) lands, this one function switches to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.names import order_key

from .verify import OrderRef

CHUNK = 5_000


async def order_statuses(redis: Any, refs: Sequence[OrderRef]) -> list[str | None]:
    """Each order's pipeline status, or None when it has no record (for that device)."""
    out: list[str | None] = []
    for i in range(0, len(refs), CHUNK):
        chunk = refs[i : i + CHUNK]
        async with redis.pipeline(transaction=False) as pipe:
            for _device_id, order_id in chunk:
                pipe.hmget(order_key(order_id), "status", "device_id")
            replies = await pipe.execute()
        for (device_id, _order_id), (status, owner) in zip(chunk, replies, strict=True):
            if status is None or _text(owner) != device_id:
                out.append(None)
            else:
                out.append(_text(status))
    return out


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
