"""The live progress display (rich), shown only on a terminal."""

from __future__ import annotations

from types import TracebackType
from typing import Self

from rich.console import Console
from rich.live import Live
from rich.table import Table

from .report import RunRecord, percentiles, rates
from .tracker import Tracker

COLUMNS = (
    "connected", "queued/s", "receipted/s", "processed/s", "outbox",
    "p50/p99 receipt", "p50/p99 e2e",
)  # fmt: skip


class LiveView:
    """A table refreshed once per sample: connections, rates, outbox depth, latency."""

    def __init__(self, *, enabled: bool, console: Console | None = None) -> None:
        self.console = console or Console()
        self.enabled = enabled and self.console.is_terminal
        self._live: Live | None = None

    def __enter__(self) -> Self:
        if self.enabled:
            self._live = Live(Table(), console=self.console, refresh_per_second=2)
            self._live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.__exit__(exc_type, exc, tb)
            self._live = None

    def update(self, record: RunRecord, tracker: Tracker, devices: int) -> None:
        """Show the newest sample."""
        if self._live is None or not record.samples:
            return
        s = record.samples[-1]
        window = record.samples[-6:]
        table = Table(title=f"fleet-sim  t={s.t_s:,.0f}s / {record.duration_s:,.0f}s")
        for column in COLUMNS:
            table.add_column(column, justify="right")
        r = percentiles(list(tracker.recent_receipt_ms))
        e = percentiles(list(tracker.recent_e2e_ms))
        table.add_row(
            f"{s.connected:,}/{devices:,}",
            f"{_last(rates(window, 'submitted')):,.0f}",
            f"{_last(rates(window, 'accepted')):,.0f}",
            f"{_last(rates(window, 'processed')):,.0f}",
            f"{s.outbox_depth:,}",
            f"{r.get(50, 0):,.0f}/{r.get(99, 0):,.0f} ms",
            f"{e.get(50, 0):,.0f}/{e.get(99, 0):,.0f} ms",
        )
        if record.events:
            table.caption = "chaos: " + ", ".join(f"@{t:.0f}s {n}" for t, n in record.events)
        self._live.update(table)


def _last(values: list[float]) -> float:
    return sum(values[1:]) / max(1, len(values) - 1) if len(values) > 1 else 0.0
