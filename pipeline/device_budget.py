"""What one device may cost a worker on its health and status-query topics.

Each worker keeps a token bucket per device and topic kind (:class:`DeviceBudget`):
a message past it is acked and counted in ``pipeline_device_throttled_total``
by topic kind (never by device: bounded cardinality) before it is queued, so
it costs no Redis round trip and no publish, and the other devices' messages
never wait behind it. The workers split the shared subscriptions, so with W
workers a device gets up to W times the budget.
"""

from __future__ import annotations

import weakref
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter

from servicekit.rate_limit import TokenBuckets

# One counter per registry, shared by the health consumer and the status-query responder.
_throttled: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()


def throttled_counter(registry: CollectorRegistry | None = None) -> Counter:
    """``pipeline_device_throttled_total{topic}`` of ``registry`` (default: the global one)."""
    target = REGISTRY if registry is None else registry
    counter = _throttled.get(target)
    if counter is None:
        kwargs: dict[str, Any] = {} if registry is None else {"registry": registry}
        counter = Counter(
            "pipeline_device_throttled",
            "Device messages shed unprocessed because their device was over its budget, "
            "by topic kind (health, status_query)",
            ["topic"],
            **kwargs,
        )
        _throttled[target] = counter
    return counter


class DeviceBudget:
    """``per_min`` messages a minute per device, up to a minute's worth at once; 0: no limit."""

    def __init__(self, topic: str, per_min: float, counter: Counter) -> None:
        self._buckets = TokenBuckets(per_min / 60, max(1.0, per_min))
        self._shed = counter.labels(topic)

    def allow(self, device_id: str) -> bool:
        """Take one message from the device's budget; False (and counted) when it is spent."""
        if self._buckets.allow(device_id):
            return True
        self._shed.inc()
        return False
