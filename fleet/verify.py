"""End-to-end verification: every order a device accepted is in the streams exactly once.

After the run reaches quiescence, each order the simulated devices answered
``queued`` (HTTP 202) is checked against Redis:

* **lost**: in no ``orders:{N}`` stream entry;
* **duplicated**: in more than one entry;
* **stuck**: in a stream but without a terminal pipeline status;
* **unheard**: in a stream, but its device never heard a terminal status for
  it (a status the broker lost and nothing sent again leaves the device
  showing ``accepted`` forever). Fails the run like lost and duplicated.

Streams must not have been trimmed past the run's entries (the bridge only
trims what the pipeline has acknowledged, and a test run stays far below the
trim threshold); a trimmed entry would show up as lost, never as fine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from schemas.names import stream_key

PAGE = 10_000

OrderRef = tuple[str, str]
"""(device_id, order_id): an order's identity; order ids are unique per device only."""

StatusLookup = Callable[[list[OrderRef]], Awaitable[list[str | None]]]
"""Returns each order's pipeline status (None when it has no record)."""


@dataclass(frozen=True)
class Verdict:
    """The outcome of one verification."""

    checked: int
    lost: list[OrderRef] = field(default_factory=list)
    duplicated: dict[OrderRef, int] = field(default_factory=dict)
    stuck: list[OrderRef] = field(default_factory=list)
    extra: int = 0  # stream entries for orders no device had accepted (rogue devices, …)
    unheard: list[OrderRef] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing lost or duplicated, and every device heard each order's end.

        Stuck orders are reported, not fatal.
        """
        return not self.lost and not self.duplicated and not self.unheard


async def count_stream_entries(redis: Any, shards: int) -> Counter[OrderRef]:
    """How many entries each (device_id, order_id) has across all shard streams."""
    counts: Counter[OrderRef] = Counter()
    for shard in range(shards):
        key = stream_key(shard)
        start = "-"
        while entries := await redis.xrange(key, min=start, max="+", count=PAGE):
            for _entry_id, fields in entries:
                counts[(_text(fields[b"device_id"]), _text(fields[b"order_id"]))] += 1
            start = "(" + _text(entries[-1][0])
    return counts


async def verify(
    redis: Any,
    accepted: Iterable[OrderRef],
    *,
    shards: int,
    statuses: StatusLookup | None = None,
    terminal: frozenset[str] = frozenset({"rejected", "failed", "fulfilled"}),
    heard: Collection[OrderRef] | None = None,
) -> Verdict:
    """Check every accepted order against the streams (and the pipeline, if given).

    ``heard``: the orders whose device heard a terminal status; when given,
    every accepted order in a stream must be among them.
    """
    wanted = set(accepted)
    counts = await count_stream_entries(redis, shards)
    lost = sorted(ref for ref in wanted if counts[ref] == 0)
    duplicated = {ref: counts[ref] for ref in sorted(wanted) if counts[ref] > 1}
    stuck: list[OrderRef] = []
    if statuses is not None:
        present = sorted(ref for ref in wanted if counts[ref] > 0)
        found = await statuses(present)
        stuck = [ref for ref, status in zip(present, found, strict=True) if status not in terminal]
    extra = sum(1 for ref in counts if ref not in wanted)
    unheard: list[OrderRef] = []
    if heard is not None:
        unheard = sorted(ref for ref in wanted if counts[ref] > 0 and ref not in heard)
    return Verdict(len(wanted), lost, duplicated, stuck, extra, unheard)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
