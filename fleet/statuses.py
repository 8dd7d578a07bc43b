"""The pipeline's status of each order, for the verifier's ``stuck`` check.

One seam: the pipeline exports the lookup itself (records keyed by
``(device_id, order_id)``), so the verifier reads exactly what the orders API shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline import order_statuses as _pipeline_order_statuses

from .verify import OrderRef


async def order_statuses(redis: Any, refs: Sequence[OrderRef], shards: int) -> list[str | None]:
    """Each order's pipeline status, or None when it has no record."""
    return await _pipeline_order_statuses(redis, refs, shards=shards)
