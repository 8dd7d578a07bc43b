"""The run report: percentiles, rates and a self-contained HTML file."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from fleet.report import RunRecord, Sample, percentiles, rates, summary_table, write_html
from fleet.verify import Verdict


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
