"""How much of the intake DLQ (``orders:dlq``) one device may fill, and how long the stream is.

Two bounds. The stream's length comes from a byte budget: ``--dlq-max-bytes``,
or when that is 0 a 32nd of Redis ``maxmemory`` (64 MB of a 2 GB Redis), or
64 MiB when ``maxmemory`` is unknown; divided by the largest entry the bridge
writes (a payload cut to :data:`schemas.MAX_ORDER_BYTES` plus its fields).
And each device writes at most ``burst`` dead letters at once and
``per_min`` a minute after that (:class:`DeadLetterBudget`): past it, its
garbage is counted by reason and receipted, never stored, so a flood adds
a few entries of its own and cannot push out the other devices' entries
faster than its budget.
"""

from __future__ import annotations

from typing import Final

from schemas import MAX_ORDER_BYTES
from servicekit.rate_limit import TokenBuckets

MAX_TOPIC_CHARS: Final = 256  # a dead letter's topic is stored cut to this
ENTRY_OVERHEAD_BYTES: Final = 512  # id, field names, reason, topic, size, Redis's own
ENTRY_MAX_BYTES: Final = MAX_ORDER_BYTES + ENTRY_OVERHEAD_BYTES
DEFAULT_DLQ_BYTES: Final = 64 * 1024 * 1024
MAXMEMORY_SHARE: Final = 32
NO_DEVICE: Final = ""  # one shared budget for letters whose topic names no device


def dlq_byte_budget(max_bytes: int, maxmemory: int) -> int:
    """The bytes the intake DLQ may hold: the setting, else a share of maxmemory, else 64 MiB."""
    if max_bytes > 0:
        return max_bytes
    if maxmemory > 0:
        return maxmemory // MAXMEMORY_SHARE
    return DEFAULT_DLQ_BYTES


def dlq_entries(max_bytes: int, maxmemory: int, maxlen: int) -> int:
    """How many entries ``orders:dlq`` keeps: the byte budget over the largest entry, ≤ maxlen."""
    return max(1, min(maxlen, dlq_byte_budget(max_bytes, maxmemory) // ENTRY_MAX_BYTES))


class DeadLetterBudget:
    """Per-device token buckets for dead letters: ``burst`` at once, ``per_min`` after."""

    def __init__(self, per_min: float, burst: int, *, max_keys: int = 100_000) -> None:
        # TokenBuckets reads a rate of 0 as no limit; here it means nothing past the burst.
        rate = per_min / 60 if per_min > 0 else 1e-12
        self._buckets = TokenBuckets(rate, burst, max_keys=max_keys)

    def allow(self, device_id: str | None) -> bool:
        """Take one dead letter from the device's budget; False when it is spent."""
        return self._buckets.allow(device_id or NO_DEVICE)
