"""Dependency-free SVG line charts for the HTML report.

Axis ticks fall on round numbers (1, 2 or 5 × 10^k apart). Chaos markers are
dashed vertical lines; their labels are stacked into rows so that no two
overlap (:func:`place_labels`); labels that do not fit in
:data:`MAX_LABEL_ROWS` rows are listed under the chart instead. A label too
long for the plot on either side of its line (a storm's report) shows as a
numbered tag, ``[1]``, whose text is listed under the chart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 760, 240
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 26, 32
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")
FONT_PX = 11
CHAR_W = 6.6  # a generous average glyph width of 11 px sans-serif: estimates never undershoot
ROW_H = 13
LABEL_GAP = 6
MAX_LABEL_ROWS = 8
TICKS = 5  # about this many intervals per axis
MIN_TICKS, MAX_TICKS = 3, 7


def nice_step(span: float, ticks: int = TICKS) -> float:
    """The round step (1, 2 or 5 × 10^k) that covers ``span`` most tightly in 3–7 intervals.

    With about ``ticks`` intervals as the starting point; ties go to the larger step.
    """
    if span <= 0 or not math.isfinite(span):
        return 1.0
    power = 10.0 ** math.floor(math.log10(span / ticks))
    candidates = [m * power * scale for scale in (0.1, 1.0, 10.0) for m in (1, 2, 5)]
    fitting = [
        step for step in candidates if MIN_TICKS <= math.ceil(span / step - 1e-9) <= MAX_TICKS
    ]
    if not fitting:  # pragma: no cover - some 1/2/5 step always fits 3–7 intervals
        return power
    return min(fitting, key=lambda step: (math.ceil(span / step - 1e-9) * step, -step))


def round_ticks(top: float, ticks: int = TICKS) -> list[float]:
    """0, step, 2·step … up to the first multiple of a round step at or above ``top``."""
    step = nice_step(top, ticks)
    count = max(1, math.ceil(top / step - 1e-9))
    return [round(i * step, 10) for i in range(count + 1)]


def tick_text(value: float) -> str:
    """A tick value as text: thousands separated, no needless decimals."""
    return f"{value:,.0f}" if value >= 1 or value == 0 else f"{value:g}"


@dataclass(frozen=True)
class Placed:
    """A marker label's box: text from ``x0`` to ``x1`` on row ``row`` (-1: listed below)."""

    index: int  # of the marker, as given
    x: float  # the marker line
    x0: float
    x1: float
    row: int
    text: str
    anchor: str  # "start" (right of the line) or "end" (left of it)
    # The whole label, when ``text`` is only its tag (it fits the plot on neither side).
    note: str = ""


def text_width(text: str) -> float:
    """Estimated width in px of ``text`` at :data:`FONT_PX`."""
    return len(text) * CHAR_W


def place_labels(
    markers: Sequence[tuple[float, str]], x_min: float, x_max: float, rows: int = MAX_LABEL_ROWS
) -> list[Placed]:
    """Give each (x px, label) a row where it overlaps no other label (greedy, left to right).

    A label sits right of its line, or left of it when it would run past ``x_max``.
    Labels that fit in no row get ``row == -1``: the chart lists them below itself.
    """
    row_ends = [-math.inf] * rows
    placed: list[Placed] = []
    order = sorted(range(len(markers)), key=lambda i: markers[i][0])
    tags = 0
    for index in order:
        x, label = markers[index]
        note = ""
        if x + 3 + text_width(label) > x_max and x - 3 - text_width(label) < x_min:
            tags += 1
            label, note = f"[{tags}]", label
        width = text_width(label)
        if x + 3 + width <= x_max:
            x0, x1, anchor = x + 3, x + 3 + width, "start"
        else:
            x0, x1, anchor = max(x_min, x - 3 - width), x - 3, "end"
        row = next((r for r in range(rows) if row_ends[r] + LABEL_GAP <= x0), -1)
        if row >= 0:
            row_ends[row] = x1
        placed.append(Placed(index, x, x0, x1, row, label, anchor, note))
    return placed


def line_chart(
    xs: Sequence[float],
    series: dict[str, Sequence[float]],
    *,
    x_label: str,
    y_label: str,
    markers: Sequence[tuple[float, str]] = (),
) -> str:
    """An SVG chart of one or more series over ``xs``, with labelled vertical markers."""
    if not xs:
        return "<p>(no data)</p>"
    x_ticks = round_ticks(max(*xs, 1e-9))
    x_max = x_ticks[-1]
    y_ticks = round_ticks(max([max(values, default=0.0) for values in series.values()] + [1e-9]))
    y_max = y_ticks[-1]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + plot_w * x / x_max

    def py(y: float) -> float:
        return TOP + plot_h * (1 - y / y_max)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'font-family="sans-serif" font-size="{FONT_PX}">',
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fafafa" '
        f'stroke="#ccc"/>',
    ]
    for y in y_ticks:
        parts.append(
            f'<text class="y-tick" x="{LEFT - 4}" y="{py(y) + 4:.1f}" text-anchor="end">'
            f"{tick_text(y)}</text>"
        )
    for x in x_ticks:
        parts.append(
            f'<text class="x-tick" x="{px(x):.1f}" y="{HEIGHT - 18}" text-anchor="middle">'
            f"{tick_text(x)}</text>"
        )
    parts.append(
        f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 4}" text-anchor="middle">'
        f"{escape(x_label)}</text>"
        f'<text x="12" y="{TOP + plot_h / 2}" transform="rotate(-90 12 {TOP + plot_h / 2})" '
        f'text-anchor="middle">{escape(y_label)}</text>'
    )
    placed = place_labels([(px(t), label) for t, label in markers], LEFT, WIDTH - RIGHT)
    for label in placed:
        parts.append(
            f'<line x1="{label.x:.1f}" x2="{label.x:.1f}" y1="{TOP}" y2="{TOP + plot_h}" '
            f'stroke="#d62728" stroke-dasharray="4 3"/>'
        )
    for values, colour in zip(series.values(), COLOURS * 4, strict=False):
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, values, strict=False))
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}"/>'
        )
    for label in placed:  # over every line, with a halo: no line crosses a label's text
        if label.row >= 0:
            x_text = label.x0 if label.anchor == "start" else label.x1
            parts.append(
                f'<text class="chaos" x="{x_text:.1f}" y="{TOP + 12 + label.row * ROW_H}" '
                f'text-anchor="{label.anchor}" fill="#d62728" stroke="#fafafa" stroke-width="3" '
                f'paint-order="stroke">{escape(label.text)}</text>'
            )
    legend_x = float(LEFT)
    for name, colour in zip(series, COLOURS * 4, strict=False):  # above the plot
        parts.append(
            f'<rect x="{legend_x:.1f}" y="{TOP - 14}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{legend_x + 14:.1f}" y="{TOP - 5}">{escape(name)}</text>'
        )
        legend_x += 14 + text_width(name) + 16
    parts.append("</svg>")
    unplaced = [label for label in placed if label.row < 0]
    if unplaced:
        items = "".join(
            f"<li>{tick_text(markers[label.index][0])} s: {escape(label.note or label.text)}</li>"
            for label in unplaced
        )
        parts.append(
            f'<p>Chaos events without room for a label:</p><ul class="chaos-notes">{items}</ul>'
        )
    tagged = [label for label in placed if label.note and label.row >= 0]
    if tagged:
        items = "".join(
            f"<li>{escape(label.text)} {tick_text(markers[label.index][0])} s: "
            f"{escape(label.note)}</li>"
            for label in tagged
        )
        parts.append(f'<ul class="chaos-legend">{items}</ul>')
    return "".join(parts)
