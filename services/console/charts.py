"""Inline SVG, drawn on the server: line charts of the metrics and the traffic split bar.

No chart library and no script: an <svg> with a <title> (read by screen readers, role="img") that
scales with its box (viewBox), and the numbers in a table next to it for anyone who would rather read.
"""

from __future__ import annotations

from html import escape

from services.console.metrics import Series
from services.console.models import PALETTE

WIDTH, HEIGHT = 560, 200
LEFT, RIGHT, TOP, BOTTOM = 52, 10, 10, 24


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def line_chart(series: Series, span: float, chart_id: str) -> str:
    """`span` seconds of history on the x axis (now at the right)."""
    points = [v for line in series.lines.values() for _, v in line]
    top = max(points, default=0.0) * 1.1 or 1.0
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def xy(x: float, y: float) -> str:
        return f"{LEFT + inner_w * (1 + x / span):.1f},{TOP + inner_h * (1 - y / top):.1f}"

    title = escape(f"{series.title} ({series.unit}), last {_minutes(span)}")
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-labelledby="{chart_id}-t">',
        f'<title id="{chart_id}-t">{title}</title>',
        f'<rect x="{LEFT}" y="{TOP}" width="{inner_w}" height="{inner_h}" class="plot"/>',
    ]
    for frac in (0.0, 0.5, 1.0):
        y = TOP + inner_h * (1 - frac)
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{LEFT - 4}" y="{y + 4:.1f}" class="tick" text-anchor="end">{_fmt(top * frac)}</text>'
        )
    parts.append(
        f'<text x="{LEFT}" y="{HEIGHT - 6}" class="tick">-{_minutes(span)}</text>'
        f'<text x="{WIDTH - RIGHT}" y="{HEIGHT - 6}" class="tick" text-anchor="end">now</text>'
    )
    for i, (name, line) in enumerate(sorted(series.lines.items())):
        colour = PALETTE[i % len(PALETTE)]
        shown = [(x, y) for x, y in line if x >= -span]
        if len(shown) == 1:
            parts.append(
                f'<circle cx="{xy(*shown[0]).split(",")[0]}" cy="{xy(*shown[0]).split(",")[1]}" r="3" '
                f'fill="{colour}"><title>{escape(name)}</title></circle>'
            )
        elif shown:
            path = " ".join(xy(x, y) for x, y in shown)
            parts.append(
                f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2">'
                f"<title>{escape(name)}</title></polyline>"
            )
    parts.append("</svg>")
    return "".join(parts)


def legend(series: Series) -> list[dict]:
    """Per line: its colour, name and last value (the table under the chart)."""
    return [
        {
            "name": name,
            "color": PALETTE[i % len(PALETTE)],
            "last": _fmt(line[-1][1]) if line else "",
            "peak": _fmt(max(v for _, v in line)) if line else "",
        }
        for i, (name, line) in enumerate(sorted(series.lines.items()))
    ]


def split_bar(segments: list[dict], model: str) -> str:
    """The traffic policy as one horizontal bar, a segment per target, width = its share."""
    label = ", ".join(
        f"{s['label']}" + (f" (v{s['version']})" if s["version"] else "") + f" {s['percent']:g}%" for s in segments
    )
    parts = [
        f'<svg class="split" viewBox="0 0 100 8" preserveAspectRatio="none" role="img" '
        f'aria-label="{escape(f"traffic split of {model}: {label}")}">'
    ]
    x = 0.0
    for s in segments:
        parts.append(
            f'<rect x="{x:.2f}" y="0" width="{s["percent"]:.2f}" height="8" fill="{s["color"]}">'
            f"<title>{escape(s['label'])} {s['percent']:g}%</title></rect>"
        )
        x += s["percent"]
    parts.append("</svg>")
    return "".join(parts)


def agreement_histogram(bounds: list[float], counts: list[int], model: str, pair: str) -> str:
    """The shadow report's cosine distribution as bars, one per bucket (its upper bound under it)."""
    width, height, left, bottom = 320, 90, 4, 16
    total = sum(counts) or 1
    top = max(counts, default=0) or 1
    bar = (width - 2 * left) / max(len(counts), 1)
    summary = ", ".join(f"<= {b:g}: {c}" for b, c in zip(bounds, counts) if c) or "none"
    label = escape(f"cosine agreement of {model} {pair}, items per bucket: {summary}")
    parts = [f'<svg class="histogram" viewBox="0 0 {width} {height}" role="img" aria-label="{label}">']
    for i, (upper, count) in enumerate(zip(bounds, counts)):
        h = (height - bottom - 4) * count / top
        x = left + i * bar
        parts.append(
            f'<rect x="{x + 1:.1f}" y="{height - bottom - h:.1f}" width="{max(bar - 2, 1):.1f}" '
            f'height="{h:.1f}" fill="{PALETTE[0]}"><title>cosine &lt;= {upper:g}: {count} items '
            f"({100 * count / total:.0f}%)</title></rect>"
        )
    for i in (0, len(bounds) // 2, len(bounds) - 1):
        if 0 <= i < len(bounds):
            parts.append(
                f'<text x="{left + (i + 0.5) * bar:.1f}" y="{height - 4}" class="tick" '
                f'text-anchor="middle">{bounds[i]:g}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)
