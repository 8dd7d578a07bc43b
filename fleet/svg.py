"""Dependency-free SVG line charts for the HTML report."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

WIDTH, HEIGHT = 760, 240
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 16, 32
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")


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
    x_max = max(*xs, 1e-9)
    y_max = max([max(values, default=0.0) for values in series.values()] + [1e-9]) * 1.1
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + plot_w * x / x_max

    def py(y: float) -> float:
        return TOP + plot_h * (1 - y / y_max)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fafafa" '
        f'stroke="#ccc"/>',
    ]
    for i in range(5):
        y = y_max * i / 4
        parts.append(f'<text x="{LEFT - 4}" y="{py(y) + 4:.1f}" text-anchor="end">{y:,.0f}</text>')
        x = x_max * i / 4
        parts.append(
            f'<text x="{px(x):.1f}" y="{HEIGHT - 18}" text-anchor="middle">{x:,.0f}</text>'
        )
    parts.append(
        f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 4}" text-anchor="middle">'
        f"{escape(x_label)}</text>"
        f'<text x="12" y="{TOP + plot_h / 2}" transform="rotate(-90 12 {TOP + plot_h / 2})" '
        f'text-anchor="middle">{escape(y_label)}</text>'
    )
    for t, label in markers:
        parts.append(
            f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{TOP}" y2="{TOP + plot_h}" '
            f'stroke="#d62728" stroke-dasharray="4 3"/>'
            f'<text x="{px(t) + 3:.1f}" y="{TOP + 12}" fill="#d62728">{escape(label)}</text>'
        )
    for values, colour in zip(series.values(), COLOURS * 4, strict=False):
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, values, strict=False))
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}"/>'
        )
    legend_x = LEFT + 8
    for name, colour in zip(series, COLOURS * 4, strict=False):
        parts.append(
            f'<rect x="{legend_x}" y="{TOP + 20}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{legend_x + 14}" y="{TOP + 29}">{escape(name)}</text>'
        )
        legend_x += 14 + 7 * len(name) + 16
    parts.append("</svg>")
    return "".join(parts)
