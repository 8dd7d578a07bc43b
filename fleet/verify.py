"""End-to-end verification: every order a device accepted is in the streams exactly once.

After the run reaches quiescence, each order the simulated devices answered
``queued`` (HTTP 202) is checked against Redis:

* **lost**: in no ``orders:{N}`` stream entry;
* **duplicated**: in more than one entry;
* **stuck**: in a stream but without a terminal pipeline status. Fails the
  run: after quiescence every accepted order must have ended;
* **processed twice**: the pipeline's own writes show the order handled more
  than once: its history (the record's ``history``) or the shards' events
  streams (``orders:{N}:events``, each entry with the ``path`` of statuses one
  batch took) hold two ``received`` transitions (its record made twice) or two
  terminal statuses. Fails the run;
* **unheard**: in a stream, but its device never heard a terminal status for
  it (a status the broker lost and nothing sent again leaves the device
  showing ``accepted`` forever). Fails the run like lost and duplicated.

Streams must not have been trimmed past the run's entries (the bridge only
trims what the pipeline has acknowledged, and a test run stays far below the
trim threshold); a trimmed entry would show up as lost, never as fine. The
events stream is capped: trimming can hide a second processing, never invent
one; the histories are not capped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from pipeline import order_histories, read_events
from pipeline.names import TERMINAL_STATUSES
from schemas.names import stream_key
from servicekit.redis_clients import text

EVENTS = "orders:{N}:events"

PAGE = 10_000
HISTORY_PAGE = 5_000  # histories read per pipelined round trip
CREATED: Final = "received"  # the first status of every record: written once per record

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
    # Orders the pipeline handled more than once, with what shows it.
    processed_twice: dict[OrderRef, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Nothing lost, duplicated, stuck or processed twice; every device heard each end."""
        return not (
            self.lost or self.duplicated or self.stuck or self.unheard or self.processed_twice
        )


async def count_stream_entries(redis: Any, shards: int) -> Counter[OrderRef]:
    """How many entries each (device_id, order_id) has across all shard streams."""
    counts: Counter[OrderRef] = Counter()
    for shard in range(shards):
        key = stream_key(shard)
        start = "-"
        while entries := await redis.xrange(key, min=start, max="+", count=PAGE):
            for _entry_id, fields in entries:
                counts[(text(fields[b"device_id"]), text(fields[b"order_id"]))] += 1
            start = "(" + text(entries[-1][0])
    return counts


def _twice(counts: Counter[str], terminal: frozenset[str], where: str) -> str | None:
    """What a status count shows about an order handled twice, or None."""
    ends = sorted(status for status in counts if status in terminal)
    if counts[CREATED] > 1:
        return f"{where}: {counts[CREATED]} '{CREATED}' (record made {counts[CREATED]} times)"
    if sum(counts[status] for status in ends) > 1:
        shown = ", ".join(f"{status}×{counts[status]}" for status in ends)
        return f"{where}: {sum(counts[s] for s in ends)} terminal statuses ({shown})"
    return None


async def history_statuses(
    redis: Any, refs: Sequence[OrderRef], *, shards: int
) -> list[Counter[str]]:
    """Each order's history (the pipeline's transition list), counted by status."""
    out: list[Counter[str]] = []
    for start in range(0, len(refs), HISTORY_PAGE):
        page = await order_histories(redis, refs[start : start + HISTORY_PAGE], shards=shards)
        out += [Counter(str(change.get("status", "")) for change in lines) for lines in page]
    return out


async def event_statuses(
    redis: Any, wanted: Collection[OrderRef], *, shards: int
) -> dict[OrderRef, Counter[str]]:
    """Per wanted order, the statuses its events passed through, counted."""
    out: dict[OrderRef, Counter[str]] = {}
    async for fields in read_events(redis, shards, page=PAGE):
        ref = (fields.get("device_id", ""), fields.get("order_id", ""))
        if ref in wanted:
            path = fields.get("path") or fields.get("status", "")
            out.setdefault(ref, Counter()).update(path.split(">"))
    return out


async def find_processed_twice(
    redis: Any,
    refs: Sequence[OrderRef],
    terminal: frozenset[str] = TERMINAL_STATUSES,
    *,
    shards: int,
) -> dict[OrderRef, str]:
    """The orders among ``refs`` whose history or events show them processed twice."""
    found: dict[OrderRef, str] = {}
    for ref, counts in zip(refs, await history_statuses(redis, refs, shards=shards), strict=True):
        if (why := _twice(counts, terminal, "history")) is not None:
            found[ref] = why
    for ref, counts in (await event_statuses(redis, set(refs), shards=shards)).items():
        if ref not in found and (why := _twice(counts, terminal, EVENTS)) is not None:
            found[ref] = why
    return dict(sorted(found.items()))


async def verify(
    redis: Any,
    accepted: Iterable[OrderRef],
    *,
    shards: int,
    statuses: StatusLookup | None = None,
    terminal: frozenset[str] = TERMINAL_STATUSES,
    heard: Collection[OrderRef] | None = None,
    pipeline_writes: bool = False,
) -> Verdict:
    """Check every accepted order against the streams (and the pipeline, if given).

    ``statuses``: looks up each order's pipeline status; orders in a stream
    without a terminal one are stuck. ``heard``: the orders whose device heard
    a terminal status; when given, every accepted order in a stream must be
    among them. ``pipeline_writes``: also read the pipeline's histories and
    events stream for orders processed twice.
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
    twice: dict[OrderRef, str] = {}
    if pipeline_writes:
        twice = await find_processed_twice(
            redis, sorted(ref for ref in wanted if counts[ref] > 0), terminal, shards=shards
        )
    return Verdict(len(wanted), lost, duplicated, stuck, extra, unheard, twice)
