"""What a fleet run measured, and how it is shown: a terminal summary and an HTML report."""

from __future__ import annotations

import datetime as dt
import itertools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from rich.table import Table

from schemas.names import stream_key
from servicekit.redis_clients import text

from .cpu import CpuUse
from .looplag import Tick
from .svg import line_chart
from .tracker import Tracker
from .verify import PAGE, OrderRef, Verdict

PERCENTILES = (50, 90, 99, 99.9)


@dataclass(frozen=True)
class Sample:
    """Counters at one moment of the run (cumulative, except the gauges)."""

    t_s: float
    connected: int
    submitted: int
    accepted: int
    processed: int
    outbox_depth: int
    # Latency of the orders receipted / finished since the previous sample (None: none).
    receipt_p50_ms: float | None = None
    receipt_p99_ms: float | None = None
    e2e_p50_ms: float | None = None
    e2e_p99_ms: float | None = None


STAGES = (
    ("agent queue", "submit → first PUBLISH"),
    ("broker + bridge", "first PUBLISH → stream received_at"),
    ("pipeline", "received_at → terminal status heard by the device"),
)


@dataclass(frozen=True)
class StageLatencies:
    """Per-order time in each stage (ms), for the orders whose every timestamp is known.

    The three stages of one order add up to its submit → terminal time. The
    simulator's clock times submit, publish and the terminal status; the
    bridge's clock writes ``received_at``: on another host, their skew moves
    time between the middle and last stage (never the total).
    """

    agent_queue_ms: list[float]
    broker_bridge_ms: list[float]
    pipeline_ms: list[float]
    # Part of the pipeline stage, for the orders whose status carried the time the pipeline
    # set it: from then until the device heard it (the status's way through the broker,
    # and the simulator's loop getting to it). Same-host clocks only.
    delivery_ms: list[float] = field(default_factory=list)

    @property
    def orders(self) -> int:
        return len(self.agent_queue_ms)

    def stages(self) -> list[tuple[str, str, list[float]]]:
        """(name, span, per-order ms) of each stage, in order."""
        values = (self.agent_queue_ms, self.broker_bridge_ms, self.pipeline_ms)
        return [(name, span, v) for (name, span), v in zip(STAGES, values, strict=True)]


def stage_latencies(tracker: Tracker, received_at_ms: dict[OrderRef, int]) -> StageLatencies:
    """Split each finished order's submit → terminal time at its first PUBLISH and received_at."""
    queue: list[float] = []
    broker: list[float] = []
    pipeline: list[float] = []
    delivery: list[float] = []
    offset_ms = tracker.wall_offset_s * 1000
    for ref, submitted in tracker.submit_at.items():
        published = tracker.published_at.get(ref)
        received = received_at_ms.get(ref)
        ended = tracker.terminal_at.get(ref)
        if published is None or received is None or ended is None:
            continue
        published_ms = published * 1000 + offset_ms
        queue.append(max(0.0, (published - submitted) * 1000))
        broker.append(received - published_ms)
        pipeline.append(ended * 1000 + offset_ms - received)
        if (set_at := tracker.status_set_at.get(ref)) is not None:
            delivery.append(ended * 1000 + offset_ms - set_at)
    return StageLatencies(queue, broker, pipeline, delivery)


async def received_times(redis: Any, shards: int) -> dict[OrderRef, int]:
    """Each order's first ``received_at`` (bridge clock, ms) across the shard streams."""
    out: dict[OrderRef, int] = {}
    for shard in range(shards):
        start = "-"
        while entries := await redis.xrange(stream_key(shard), min=start, max="+", count=PAGE):
            for _entry_id, fields in entries:
                ref = (text(fields[b"device_id"]), text(fields[b"order_id"]))
                out.setdefault(ref, int(fields[b"received_at"]))
            start = "(" + text(entries[-1][0])
    return out


async def stage_breakdown(redis: Any, shards: int, tracker: Tracker) -> StageLatencies:
    """The run's stage latencies, reading received_at from the streams."""
    return stage_latencies(tracker, await received_times(redis, shards))


@dataclass
class RunRecord:
    """Everything a run recorded; the simulator fills it, the report reads it."""

    devices: int
    rate: float
    duration_s: float
    samples: list[Sample] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    receipt_latency_ms: list[float] = field(default_factory=list)
    e2e_latency_ms: list[float] = field(default_factory=list)
    refused: int = 0
    verdict: Verdict | None = None
    stages: StageLatencies | None = None
    # CPU of the load generator (and of the stack, when fleet-sim started it) over the run.
    cpu: CpuUse | None = None
    # The same over the load window only (its orders: those queued in it).
    cpu_load: CpuUse | None = None
    # The simulator's event-loop lag (fleet.looplag): each wakeup of its ticker (t: s since
    # the load began); empty unless asked for (and with worker processes).
    loop_lag: list[Tick] = field(default_factory=list)


def cpu_rows(record: RunRecord) -> list[tuple[str, str]]:
    """(name, text) rows: the generator's and the cloud's CPU, in cores and µs per order."""
    rows: list[tuple[str, str]] = []
    orders = record.verdict.checked if record.verdict is not None else 0
    orders = orders or (record.samples[-1].submitted if record.samples else 0)
    for use, when in ((record.cpu_load, "during the load"), (record.cpu, "load + settle")):
        if use is None:
            continue

        def row(seconds: float, use: CpuUse = use) -> str:
            return (f"{seconds:,.1f} s = {use.cores(seconds):.2f} cores, "
                    f"{use.per_order_us(seconds, orders):,.0f} µs/order")  # fmt: skip

        rows.append((f"load generator CPU, {when} ({use.wall_s:,.0f} s)", row(use.generator_s)))
        if use.cloud_s:
            rows.append((f"cloud CPU, {when}", row(sum(use.cloud_s.values()))))
            rows += [(f"  {name}", row(seconds)) for name, seconds in use.cloud_s.items()]
    return rows


def percentiles(values: Sequence[float]) -> dict[float, float]:
    """p50/p90/p99/p99.9 of ``values`` (empty input: empty result)."""
    if len(values) < 2:
        return dict.fromkeys(PERCENTILES, values[0]) if values else {}
    cuts = statistics.quantiles(values, n=1000, method="inclusive")
    return {p: cuts[min(int(p * 10) - 1, len(cuts) - 1)] for p in PERCENTILES}


def rates(samples: Sequence[Sample], attr: str) -> list[float]:
    """Per-second rate of a cumulative counter between consecutive samples."""
    out = [0.0]
    for prev, cur in itertools.pairwise(samples):
        span = max(cur.t_s - prev.t_s, 1e-9)
        out.append((getattr(cur, attr) - getattr(prev, attr)) / span)
    return out


def summary_table(record: RunRecord) -> Table:
    """The end-of-run summary for the terminal."""
    last = record.samples[-1] if record.samples else Sample(0, 0, 0, 0, 0, 0)
    table = Table(title="fleet-sim summary", show_header=False)
    table.add_row("devices", f"{record.devices:,}")
    table.add_row("orders queued (202)", f"{last.submitted:,}")
    table.add_row("orders refused by agents", f"{record.refused:,}")
    table.add_row("receipts (accepted/duplicate)", f"{last.accepted:,}")
    table.add_row("terminal statuses", f"{last.processed:,}")
    span = max(last.t_s, 1e-9)
    table.add_row("mean submit rate", f"{last.submitted / span:,.0f}/s")
    for name, values in (
        ("receipt latency", record.receipt_latency_ms),
        ("end-to-end latency", record.e2e_latency_ms),
    ):
        cuts = percentiles(values)
        if cuts:
            table.add_row(name, " ".join(f"p{p:g}={v:,.0f}ms" for p, v in cuts.items()))
    if record.loop_lag:
        cuts = percentiles([tick.late_ms for tick in record.loop_lag])
        table.add_row(
            "  simulator's loop lag", " ".join(f"p{p:g}={v:,.1f}ms" for p, v in cuts.items())
        )
    if record.stages is not None and record.stages.orders:
        for name, _span, values in record.stages.stages():
            cuts = percentiles(values)
            table.add_row(
                f"  {name}",
                f"mean={statistics.fmean(values):,.1f}ms "
                + " ".join(f"p{p:g}={v:,.0f}ms" for p, v in cuts.items()),
            )
        if record.stages.delivery_ms:
            cuts = percentiles(record.stages.delivery_ms)
            table.add_row(
                "    of it, status set → heard",
                " ".join(f"p{p:g}={v:,.0f}ms" for p, v in cuts.items()),
            )
    for name, text_ in cpu_rows(record):
        table.add_row(name, text_)
    for t_s, label in record.events:
        table.add_row(f"chaos @{t_s:,.0f}s", label)
    if record.verdict is not None:
        v = record.verdict
        table.add_row("verification", "PASS" if v.ok else "FAIL")
        table.add_row(
            "lost / duplicated / stuck", f"{len(v.lost)} / {len(v.duplicated)} / {len(v.stuck)}"
        )
        table.add_row("terminal status never heard", f"{len(v.unheard)}")
        table.add_row("processed twice", f"{len(v.processed_twice)}")
    return table


def write_html(record: RunRecord, path: Path) -> Path:
    """Write the HTML report (inline SVG plots, no external assets) and return its path."""
    xs = [s.t_s for s in record.samples]
    throughput = line_chart(
        xs,
        {
            "queued/s": rates(record.samples, "submitted"),
            "receipted/s": rates(record.samples, "accepted"),
            "processed/s": rates(record.samples, "processed"),
        },
        x_label="seconds",
        y_label="orders/s",
        markers=record.events,
    )
    depth = line_chart(
        xs,
        {"outbox depth": [float(s.outbox_depth) for s in record.samples],
         "connected devices": [float(s.connected) for s in record.samples]},
        x_label="seconds",
        y_label="count",
        markers=record.events,
    )  # fmt: skip
    latency = _latency_chart(record)
    rows = "".join(
        f"<tr><td>{escape(name)}</td>"
        + "".join(f"<td>{v:,.1f}</td>" for v in percentiles(values).values())
        + "</tr>"
        for name, values in (
            ("submit → receipt", record.receipt_latency_ms),
            ("submit → terminal status", record.e2e_latency_ms),
        )
        if values
    )
    verdict = _verdict_html(record.verdict)
    header = "".join(f"<th>p{p:g} ms</th>" for p in PERCENTILES)
    html = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fleet-sim report</title>
<style>body{{font-family:sans-serif;max-width:800px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}</style></head>
<body><h1>fleet-sim report</h1>
<p>{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M UTC}: {record.devices:,} devices,
target {record.rate:,.0f} orders/s for {record.duration_s:,.0f} s.</p>
{verdict}
<h2>Throughput (dashed lines: chaos events)</h2>{throughput}
<h2>Outbox depth and connections</h2>{depth}
<h2>Latency</h2>{latency}<table><tr><th></th>{header}</tr>{rows}</table>
{_stages_html(record.stages)}
{_cpu_html(record)}
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html)
    return path


def _latency_chart(record: RunRecord) -> str:
    """p50/p99 per sample interval, if the run recorded them."""
    if not any(s.receipt_p99_ms is not None for s in record.samples):
        return ""
    series: dict[str, Sequence[float]] = {
        name: [float(getattr(s, attr) or 0.0) for s in record.samples]
        for name, attr in (
            ("receipt p50", "receipt_p50_ms"), ("receipt p99", "receipt_p99_ms"),
            ("e2e p50", "e2e_p50_ms"), ("e2e p99", "e2e_p99_ms"),
        )
    }  # fmt: skip
    chart = line_chart(
        [s.t_s for s in record.samples], series, x_label="seconds", y_label="ms",
        markers=record.events,
    )  # fmt: skip
    return f"<p>Per second, for the orders settled in that second:</p>{chart}"


def _stages_html(stages: StageLatencies | None) -> str:
    """Where the time goes: each stage's percentiles, mean and share of the mean total."""
    if stages is None or not stages.orders:
        return ""
    total = sum(statistics.fmean(values) for _, _, values in stages.stages())
    header = "".join(f"<th>p{p:g} ms</th>" for p in PERCENTILES)
    rows = []
    for name, span, values in stages.stages():
        mean = statistics.fmean(values)
        share = 100 * mean / total if total > 0 else 0.0
        cells = "".join(f"<td>{v:,.1f}</td>" for v in percentiles(values).values())
        rows.append(
            f'<tr class="stage"><td>{escape(name)}<br><small>{escape(span)}</small></td>{cells}'
            f"<td>{mean:,.1f}</td><td>{share:.0f} %</td></tr>"
        )
    return (
        f"<h2>Latency by stage</h2><p>{stages.orders:,} orders with every timestamp; "
        f"their stages add up to a mean submit → terminal of {total:,.1f} ms.</p>"
        f"<table><tr><th>stage</th>{header}<th>mean ms</th><th>share</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _cpu_html(record: RunRecord) -> str:
    """The load generator's CPU beside the cloud's: which side was the limit."""
    rows = cpu_rows(record)
    if not rows:
        return ""
    body = "".join(f"<tr><td>{escape(name)}</td><td>{escape(t)}</td></tr>" for name, t in rows)
    return (
        "<h2>CPU: load generator and cloud</h2><p>From the start of the load until the run "
        "settled; per order: over the orders verified. A side near its cores (this machine "
        "has them all) was the limit.</p>"
        f'<table class="cpu">{body}</table>'
    )


def _verdict_html(verdict: Verdict | None) -> str:
    if verdict is None:
        return "<p>Verification was not run.</p>"
    status = "PASS" if verdict.ok else "FAIL"
    lines = [
        f"<h2>Verification: {status}</h2>",
        f"<p>{verdict.checked:,} accepted orders checked: {len(verdict.lost)} lost, "
        f"{len(verdict.duplicated)} duplicated, {len(verdict.stuck)} stuck, "
        f"{len(verdict.processed_twice)} processed twice; "
        f"{verdict.extra} stream entries from outside the run; {len(verdict.unheard)} "
        "whose device never heard a terminal status.</p>",
    ]
    named = (("lost", verdict.lost), ("duplicated", list(verdict.duplicated)),
             ("stuck", verdict.stuck), ("no terminal status heard", verdict.unheard),
             ("processed twice", list(verdict.processed_twice)))  # fmt: skip
    for name, refs in named:
        if refs:
            shown = ", ".join(f"{d}/{o}" for d, o in refs[:100])
            lines.append(f"<p>{name}: {escape(shown)}</p>")
    return "".join(lines)
