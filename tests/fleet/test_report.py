"""The run report: percentiles, rates and a self-contained HTML file."""

from __future__ import annotations

import html as html_lib
import itertools
import math
import re
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from rich.console import Console

from fleet.report import (
    RunRecord,
    Sample,
    percentiles,
    rates,
    received_times,
    stage_latencies,
    summary_table,
    write_html,
)
from fleet.svg import MAX_LABEL_ROWS, line_chart, place_labels, round_ticks, text_width
from fleet.tracker import Tracker
from fleet.verify import OrderRef, Verdict
from schemas.names import stream_key


def record() -> RunRecord:
    """A small run with one chaos event and one lost order."""
    samples = [Sample(t, 10, 100 * t, 90 * t, 80 * t, 5) for t in range(11)]
    return RunRecord(
        devices=10, rate=100, duration_s=10, samples=samples,
        events=[(4.0, "broker restart")],
        receipt_latency_ms=[float(i) for i in range(1, 1001)],
        verdict=Verdict(checked=1000, lost=[("dev-1", "order-0001")]),
    )  # fmt: skip


def test_percentiles_and_rates() -> None:
    """p50 of 1..1000 is ~500, p99 ~990; rates difference cumulative counters."""
    cuts = percentiles([float(i) for i in range(1, 1001)])
    assert 499 <= cuts[50] <= 501
    assert 989 <= cuts[99] <= 991
    assert percentiles([]) == {}
    assert rates([Sample(0, 0, 0, 0, 0, 0), Sample(2, 0, 10, 0, 0, 0)], "submitted") == [0.0, 5.0]


def test_html_report_has_plots_events_and_the_verdict(tmp_path: Path) -> None:
    """The report is one HTML file with SVG plots, the chaos marker and the lost order's id."""
    html = write_html(record(), tmp_path / "r" / "report.html").read_text()
    assert html.count("<svg") == 2
    assert "broker restart" in html
    assert "Verification: FAIL" in html
    assert "dev-1/order-0001" in html


def test_summary_table_renders() -> None:
    """The terminal summary names the verdict and the latency percentiles."""
    console = Console(record=True, width=120)
    console.print(summary_table(record()))
    text = console.export_text()
    assert "FAIL" in text
    assert "p50=" in text
    assert "1 / 0 / 0" in text


def test_html_report_plots_latency_over_time_when_recorded(tmp_path: Path) -> None:
    """Samples with per-interval percentiles add a third chart: latency over time."""
    run = record()
    run.samples = [
        Sample(t, 10, 100 * t, 90 * t, 80 * t, 5, 40.0, 90.0, 60.0, 120.0) for t in range(11)
    ]
    html = write_html(run, tmp_path / "report.html").read_text()
    assert html.count("<svg") == 3
    assert "receipt p99" in html


def tracker_with_stages() -> Tracker:
    """Three orders with known stage times (ms): queue 5/10/15, broker 20/20/40, pipeline 100."""
    tracker = Tracker(wall_offset_s=1_000_000.0)
    for i, (queue, broker) in enumerate(((5, 20), (10, 20), (15, 40))):
        ref = ("dev-1", f"order-{i:04d}")
        submitted = 100.0 + i
        tracker.queued(ref, submitted)
        tracker.published_at[ref] = submitted + queue / 1000
        tracker.terminal_at[ref] = submitted + (queue + broker + 100) / 1000
        tracker.e2e_latency_ms.append(queue + broker + 100.0)
    tracker.queued(("dev-1", "no-publish"), 200.0)  # never published: left out
    return tracker


def received(tracker: Tracker) -> dict[OrderRef, int]:
    """received_at (bridge clock = wall clock here) of the tracker's published orders."""
    stages = {"order-0000": 20, "order-0001": 20, "order-0002": 40}
    return {
        ref: round((tracker.published_at[ref] + tracker.wall_offset_s) * 1000) + stages[ref[1]]
        for ref in tracker.published_at
    }


def test_stage_breakdown_splits_each_order_and_adds_up() -> None:
    """Per order, agent queue + broker/bridge + pipeline equals its submit → terminal time."""
    tracker = tracker_with_stages()
    stages = stage_latencies(tracker, received(tracker))
    assert stages.orders == 3
    assert stages.agent_queue_ms == pytest.approx([5, 10, 15], abs=0.01)
    assert stages.broker_bridge_ms == pytest.approx([20, 20, 40], abs=1.0)
    assert stages.pipeline_ms == pytest.approx([100, 100, 100], abs=1.0)
    totals = [sum(t) for t in zip(stages.agent_queue_ms, stages.broker_bridge_ms,
                                  stages.pipeline_ms, strict=True)]  # fmt: skip
    assert totals == pytest.approx(tracker.e2e_latency_ms, abs=0.01)
    assert stages.delivery_ms == []  # no status said when the pipeline set it


def test_the_pipeline_stage_splits_at_the_time_the_status_was_set() -> None:
    """A status carrying its ``at``: heard 30 ms after the pipeline set it."""
    tracker = tracker_with_stages()
    ref = ("dev-1", "order-0001")
    tracker.terminal.add(ref)  # heard at its terminal_at: these only tell when it was set
    heard_ms = (tracker.terminal_at[ref] + tracker.wall_offset_s) * 1000
    tracker.status(ref, "fulfilled", round(heard_ms - 30))
    tracker.status(ref, "fulfilled", round(heard_ms - 90))  # heard again: the first counts
    stages = stage_latencies(tracker, received(tracker))
    assert stages.delivery_ms == pytest.approx([30], abs=1.0)


def test_stage_breakdown_is_in_the_report_and_summary(tmp_path: Path) -> None:
    """The HTML has a row per stage with its percentiles, mean and share; the summary too."""
    tracker = tracker_with_stages()
    run = record()
    run.stages = stage_latencies(tracker, received(tracker))
    html = write_html(run, tmp_path / "report.html").read_text()
    rows = re.findall(r'<tr class="stage"><td>([^<]+)<br>.*?</tr>', html)
    assert rows == ["agent queue", "broker + bridge", "pipeline"]
    shares = [int(v) for v in re.findall(r"<td>(\d+) %</td>", html)]
    assert shares == [7, 20, 73]  # means 10, 26.7 and 100 of 136.7 ms
    assert sum(shares) == 100
    assert "3 orders with every timestamp" in html
    console = Console(record=True, width=160)
    console.print(summary_table(run))
    text = console.export_text()
    assert "agent queue" in text
    assert "mean=10.0ms" in text


async def test_received_times_reads_the_first_entry_of_each_order(redis_url: str) -> None:
    """received_at comes from the shard streams; a duplicate entry does not move it."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        for received_at in (1000, 2000):
            await client.xadd(stream_key(1), {"device_id": "d", "order_id": "o-1",
                                              "received_at": received_at})  # fmt: skip
        await client.xadd(stream_key(0), {"device_id": "d", "order_id": "o-2",
                                          "received_at": 3000})  # fmt: skip
        assert await received_times(client, 2) == {("d", "o-1"): 1000, ("d", "o-2"): 3000}
    finally:
        await client.aclose()


def chaos_labels(svg: str) -> list[tuple[float, float, float]]:
    """(x0, x1, y) of each chaos label in the SVG, its width estimated as the chart does."""
    boxes = []
    for x, y, anchor, text in re.findall(
        r'<text class="chaos" x="([\d.]+)" y="([\d.]+)" text-anchor="(\w+)"[^>]*>([^<]*)</text>',
        svg,
    ):
        width = text_width(html_lib.unescape(text))
        x0 = float(x) if anchor == "start" else float(x) - width
        boxes.append((x0, x0 + width, float(y)))
    return boxes


def test_close_chaos_labels_never_overlap() -> None:
    """Events a second apart get rows of their own; too many are listed under the chart."""
    events = [(10.0 + i, f"event number {i}") for i in range(11)] + [(99.0, "at the end")]
    svg = line_chart([float(t) for t in range(101)], {"a": [1.0] * 101}, x_label="s",
                     y_label="n", markers=events)  # fmt: skip
    boxes = chaos_labels(svg)
    assert len(boxes) == MAX_LABEL_ROWS + 1  # eight stacked rows, plus the one at the end
    for a, b in itertools.combinations(boxes, 2):
        same_row = a[2] == b[2]
        assert not (same_row and a[0] < b[1] and b[0] < a[1]), (a, b)
    for x0, x1, _ in boxes:
        assert x0 >= 0
        assert x1 <= 760
    assert svg.count('stroke-dasharray="4 3"') == len(events)  # every event keeps its line
    listed = re.findall(r"<li>([^<]+)</li>", svg)
    assert listed == ["18 s: event number 8", "19 s: event number 9", "20 s: event number 10"]


def test_place_labels_uses_the_first_free_row() -> None:
    """Far-apart labels share row 0; a label past the right edge sits left of its line."""
    placed = place_labels([(100, "a"), (300, "b"), (105, "c"), (740, "late")], 56, 744)
    assert [p.row for p in sorted(placed, key=lambda p: p.index)] == [0, 0, 1, 0]
    late = next(p for p in placed if p.text == "late")
    assert late.anchor == "end"
    assert late.x1 <= 740


@pytest.mark.parametrize("top", [1017.0 * 1.1, 339.0, 7.0, 0.42, 12_345.0, 1.0])
def test_axis_ticks_are_round(top: float) -> None:
    """Ticks start at 0, step by 1, 2 or 5 × 10^k, and the last one covers the data."""
    ticks = round_ticks(top)
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert round(mantissa, 6) in (1.0, 2.0, 5.0)
    assert ticks[0] == 0
    assert ticks[-1] >= top
    assert ticks[-1] - step < top
    assert 3 <= len(ticks) - 1 <= 7
    for a, b in itertools.pairwise(ticks):
        assert b - a == pytest.approx(step)


def test_chart_ticks_are_round_numbers() -> None:
    """The throughput chart of a 1,017 s run labels 0, 200, … 1,200, not 339, 678, 1,017."""
    xs = [float(t) for t in range(0, 1018)]
    svg = line_chart(xs, {"a": [float(t) for t in xs]}, x_label="s", y_label="n")
    x_ticks = re.findall(r'<text class="x-tick"[^>]*>([^<]+)</text>', svg)
    assert x_ticks == ["0", "200", "400", "600", "800", "1,000", "1,200"]
    y_ticks = re.findall(r'<text class="y-tick"[^>]*>([^<]+)</text>', svg)
    assert y_ticks == x_ticks


def test_a_label_too_long_for_the_plot_becomes_a_tag_with_a_legend_below() -> None:
    """A storm's long report neither runs off the left edge nor is lost: tag in, text below."""
    long = "storm=10000: " + "10,000 connection attempts in 1 s (0.09 cores); " * 3
    svg = line_chart([0.0, 10.0, 20.0], {"a": [1.0, 2.0, 3.0]}, x_label="s", y_label="n",
                     markers=[(10.0, long), (15.0, "short")])  # fmt: skip
    labels = re.findall(r'<text class="chaos" x="([0-9.]+)"[^>]*>([^<]+)</text>', svg)
    assert [text for _, text in labels] == ["[1]", "short"]
    assert all(float(x) >= 56 for x, _ in labels)  # nothing starts left of the plot
    legend = re.findall(r'<ul class="chaos-legend"><li>([^<]+)</li>', svg)
    assert legend == [f"[1] 10 s: {html_lib.escape(long)}"]
