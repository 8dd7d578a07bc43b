"""The geo verifier: every region's streams merged with the devices' outboxes and receipts.

Per ``(device_id, order_id)`` it counts stream entries across *all* regions
(:func:`fleet.verify.count_stream_entries` per region) and checks GEO.md's promise:

* **duplicated**: more than one entry across the regions (at the end, or in
  any sample the :class:`CountMonitor` took during the run);
* **lost**: an order a device accepted (HTTP 202) that is in no region's
  streams and no longer in its outbox either;
* **in doubt**: in no stream yet but still unsettled in its outbox (the agent
  keeps it: a region down or partitioned). Reported with its authority; a
  healed run must have none;
* **misplaced**: an entry in a region that is not the first name of the
  order's on-disk ``attempts`` (orders without ``attempts`` may be anywhere);
* **stuck** / **processed twice**: as :mod:`fleet.verify`, each checked in
  the region that holds the entry.

``ok`` requires none of these. Orders whose device has not yet heard a
terminal status are reported (``unheard``) but do not fail a geo run: the
status is published in the order's authority region, and a device that
failed over hears it after failing back (or by status recovery).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from pipeline.names import TERMINAL_STATUSES

from ..verify import OrderRef, count_stream_entries, find_processed_twice

RegionStatusLookup = Callable[[Any, Sequence[OrderRef], int], Awaitable[list[str | None]]]
"""(region's Redis client, refs, shards) → each order's pipeline status there."""


@dataclass(frozen=True)
class OutboxRow:
    """What a device's outbox says about one order."""

    attempts: tuple[str, ...]
    settled: bool


@dataclass(frozen=True)
class GeoVerdict:
    """The outcome of a geo verification."""

    checked: int
    per_region: dict[str, int] = field(default_factory=dict)  # entries of accepted orders
    lost: list[OrderRef] = field(default_factory=list)
    duplicated: dict[OrderRef, int] = field(default_factory=dict)
    in_doubt: dict[OrderRef, str] = field(default_factory=dict)  # ref → its authority
    misplaced: dict[OrderRef, str] = field(default_factory=dict)  # ref → "in X, owner Y"
    stuck: list[OrderRef] = field(default_factory=list)
    processed_twice: dict[OrderRef, str] = field(default_factory=dict)
    unheard: list[OrderRef] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)  # regions whose Redis did not answer
    # From the run's samples: the highest count any order ever had, and the most
    # orders in doubt at once (sent, unreceipted, in no stream).
    max_count_seen: int = 0
    max_in_doubt_seen: int = 0

    @property
    def consistent(self) -> bool:
        """The streams' side alone: 0 lost, 0 duplicated (ever), 0 in doubt, 0 misplaced."""
        return (
            not (
                self.lost or self.duplicated or self.in_doubt or self.misplaced or self.unreachable
            )
            and self.max_count_seen <= 1
        )

    @property
    def ok(self) -> bool:
        """0 lost, 0 duplicated (ever), 0 in doubt, 0 misplaced, 0 stuck, 0 processed twice."""
        return not (
            self.lost
            or self.duplicated
            or self.in_doubt
            or self.misplaced
            or self.stuck
            or self.processed_twice
            or self.unreachable
            or self.max_count_seen > 1
        )

    def lines(self) -> list[str]:
        """The report, one line per figure."""
        regions = ", ".join(f"{name}: {n:,}" for name, n in self.per_region.items())
        out = [
            f"accepted orders checked: {self.checked:,}",
            f"stream entries per region: {regions}",
            f"lost: {len(self.lost)}",
            f"duplicated: {len(self.duplicated)} (highest count ever sampled: "
            f"{self.max_count_seen})",
            f"in doubt now: {len(self.in_doubt)} (most at once during the run: "
            f"{self.max_in_doubt_seen})",
            f"in a region other than their authority: {len(self.misplaced)}",
            f"stuck (no terminal status): {len(self.stuck)}",
            f"processed twice: {len(self.processed_twice)}",
            f"terminal status not yet heard by the device: {len(self.unheard)}",
        ]
        if self.unreachable:
            out.append(f"UNREACHABLE regions: {', '.join(self.unreachable)}")
        out.append(f"verdict: {'PASS' if self.ok else 'FAIL'}")
        return out


def read_outbox_file(path: Path) -> dict[str, OutboxRow]:
    """order_id → (attempts, settled) from an agent's outbox file, read-only."""
    uri = f"file:{path}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as conn:
        return read_outbox(conn)


def read_outbox(conn: sqlite3.Connection) -> dict[str, OutboxRow]:
    """order_id → (attempts, settled) through an open outbox connection."""
    rows = conn.execute("SELECT order_id, regions, settled_ms IS NOT NULL FROM orders")
    return {
        str(order_id): OutboxRow(tuple(filter(None, str(regions).split(","))), bool(settled))
        for order_id, regions, settled in rows
    }


async def region_counts(
    clients: Mapping[str, Any], shards: int
) -> tuple[dict[str, Counter[OrderRef]], list[str]]:
    """Entries per order in each region's streams; and the regions that did not answer."""
    counts: dict[str, Counter[OrderRef]] = {}
    unreachable: list[str] = []
    for name, client in clients.items():
        try:
            counts[name] = await count_stream_entries(client, shards)
        except (RedisError, OSError):
            unreachable.append(name)
    return counts, unreachable


def merged(counts: Mapping[str, Counter[OrderRef]]) -> Counter[OrderRef]:
    """Counts summed over the regions."""
    total: Counter[OrderRef] = Counter()
    for per in counts.values():
        total.update(per)
    return total


async def verify_geo(
    clients: Mapping[str, Any],
    accepted: Iterable[OrderRef],
    outboxes: Mapping[OrderRef, OutboxRow],
    *,
    shards: int,
    statuses: RegionStatusLookup | None = None,
    heard: Collection[OrderRef] | None = None,
    pipeline_writes: bool = True,
    monitor: CountMonitor | None = None,
) -> GeoVerdict:
    """Check every accepted order against every region (``clients``: name → Redis client).

    ``outboxes`` holds each order's outbox row (attempts, settled); an order
    missing from it was pruned after settling, so it counts as settled.
    """
    wanted = set(accepted)
    counts, unreachable = await region_counts(clients, shards)
    total = merged(counts)
    per_region = {name: sum(per[ref] for ref in wanted) for name, per in counts.items()}
    duplicated = {ref: total[ref] for ref in sorted(wanted) if total[ref] > 1}
    lost: list[OrderRef] = []
    in_doubt: dict[OrderRef, str] = {}
    for ref in sorted(wanted):
        if total[ref] > 0:
            continue
        row = outboxes.get(ref)
        if row is not None and not row.settled:
            in_doubt[ref] = row.attempts[0] if row.attempts else "?"
        else:
            lost.append(ref)
    misplaced: dict[OrderRef, str] = {}
    for name, per in counts.items():
        for ref in sorted(wanted & set(per)):
            row = outboxes.get(ref)
            if row is not None and row.attempts and row.attempts[0] != name:
                misplaced[ref] = f"in {name}, authority {row.attempts[0]}"
    stuck: list[OrderRef] = []
    twice: dict[OrderRef, str] = {}
    for name, per in counts.items():
        here = sorted(ref for ref in wanted if per[ref] > 0)
        if not here:
            continue
        client = clients[name]
        if statuses is not None:
            found = await statuses(client, here, shards)
            stuck += [r for r, s in zip(here, found, strict=True) if s not in TERMINAL_STATUSES]
        if pipeline_writes:
            twice.update(await find_processed_twice(client, here, shards=shards))
    unheard = sorted(r for r in wanted if total[r] > 0 and heard is not None and r not in heard)
    return GeoVerdict(
        checked=len(wanted),
        per_region=per_region,
        lost=lost,
        duplicated=duplicated,
        in_doubt=in_doubt,
        misplaced=misplaced,
        stuck=sorted(stuck),
        processed_twice=dict(sorted(twice.items())),
        unheard=unheard,
        unreachable=unreachable,
        max_count_seen=max(monitor.max_count if monitor else 0, max(total.values(), default=0)),
        max_in_doubt_seen=monitor.max_in_doubt if monitor else 0,
    )


class CountMonitor:
    """Samples the merged counts during a run: no order may ever count twice.

    Each sample reads every reachable region; an order whose entries sum to
    more than one at any moment is recorded with the time it was seen.
    ``in_doubt`` (a callable the run supplies) says how many orders are in
    doubt right now; its highest value is kept for the report.
    """

    def __init__(
        self,
        clients: Mapping[str, Any],
        shards: int,
        in_doubt: Callable[[], int] | None = None,
        interval_s: float = 1.0,
    ) -> None:
        self.clients = clients
        self.shards = shards
        self.in_doubt = in_doubt
        self.interval_s = interval_s
        self.max_count = 0
        self.max_in_doubt = 0
        self.samples = 0
        self.twice: dict[OrderRef, float] = {}
        self._started = time.monotonic()

    async def sample(self) -> None:
        """Take one sample now."""
        counts, _unreachable = await region_counts(self.clients, self.shards)
        total = merged(counts)
        self.samples += 1
        self.max_count = max(self.max_count, max(total.values(), default=0))
        for ref, n in total.items():
            if n > 1:
                self.twice.setdefault(ref, time.monotonic() - self._started)
        if self.in_doubt is not None:
            self.max_in_doubt = max(self.max_in_doubt, self.in_doubt())

    async def run(self, stop: asyncio.Event) -> None:
        """Sample every ``interval_s`` until ``stop`` is set, and once more then."""
        while not stop.is_set():
            await self.sample()
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except TimeoutError:
                continue
        await self.sample()
