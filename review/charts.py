"""The progress chart as inline SVG, drawn on the server: no script library, no network, readable without JS.

Colours come from CSS classes (the page's theme), never from inline styles, so the
Content-Security-Policy can forbid inline styles and the dark theme applies to the chart too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from markupsafe import Markup, escape

from review.progress_data import Point

WIDTH, HEIGHT = 760, 260
LEFT, RIGHT, TOP, BOTTOM = 48, 52, 16, 34


def _nice_max(value: int) -> int:
    """A round top for the returns axis whose quarters are whole round numbers (4 × 1, 2 or 5 × 10^k)."""
    need = max(1, value) / 4
    magnitude = 1
    while True:
        for factor in (1, 2, 5):
            if factor * magnitude >= need:
                return 4 * factor * magnitude
        magnitude *= 10


def progress_chart(
    series: Sequence[Point], registered: int, bucket_seconds: int, clock: Callable[[float], str]
) -> Markup:
    """Bars: returns received per step (left axis). Line: share of the registry reported (right axis)."""
    minutes = bucket_seconds // 60
    title = "Retours reçus et bureaux remontés au fil du temps"
    desc = (
        f"Barres : retours reçus par tranche de {minutes} min (axe de gauche). "
        "Ligne : part des bureaux du registre ayant remonté (axe de droite, en %)."
    )
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-labelledby="chart-title chart-desc"'
        ' xmlns="http://www.w3.org/2000/svg" preserveAspectRatio="xMidYMid meet">',
        f'<title id="chart-title">{escape(title)}</title><desc id="chart-desc">{escape(desc)}</desc>',
    ]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    base = TOP + plot_h
    top_returns = _nice_max(max((p.returns for p in series), default=0))
    # Grid and the two axes' labels: returns on the left, percent on the right.
    for i in range(5):
        y = base - plot_h * i / 4
        parts.append(f'<line class="chart-grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(
            f'<text class="chart-label" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{round(top_returns * i / 4)}</text>"
        )
        parts.append(
            f'<text class="chart-label chart-label-line" x="{WIDTH - RIGHT + 6}" y="{y + 4:.1f}">{25 * i} %</text>'
        )
    if not series:
        parts.append(
            f'<text class="chart-empty" x="{WIDTH / 2}" y="{TOP + plot_h / 2}" text-anchor="middle">'
            "Aucun retour reçu pour l'instant</text>"
        )
    else:
        n = len(series)
        slot = plot_w / n
        bar_w = max(1.0, min(slot * 0.7, 28.0))
        points = []
        for i, p in enumerate(series):
            x = LEFT + i * slot
            h = plot_h * p.returns / top_returns
            parts.append(
                f'<rect class="chart-bar" x="{x + (slot - bar_w) / 2:.1f}" y="{base - h:.1f}" '
                f'width="{bar_w:.1f}" height="{h:.1f}"><title>{escape(clock(p.at))} : {p.returns} retours, '
                f"{p.reported} bureaux remontés</title></rect>"
            )
            share = p.reported / registered if registered else 0.0
            points.append(f"{x + slot / 2:.1f},{base - plot_h * min(1.0, share):.1f}")
        parts.append(f'<polyline class="chart-line" points="{" ".join(points)}"/>')
        last_x, last_y = points[-1].split(",")
        parts.append(f'<circle class="chart-point" cx="{last_x}" cy="{last_y}" r="4"/>')
        ticks = sorted({0, n - 1, *range(0, n, max(1, n // 6))})
        for i in ticks:
            if 0 < i < n - 1 and n - 1 - i < max(1, n // 12):
                continue  # keep the last label from overlapping its neighbour
            x = LEFT + i * slot + slot / 2
            parts.append(
                f'<text class="chart-label" x="{x:.1f}" y="{HEIGHT - 12}" text-anchor="middle">'
                f"{escape(clock(series[i].at))}</text>"
            )
    parts.append(f'<line class="chart-axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{base}" y2="{base}"/>')
    parts.append("</svg>")
    return Markup("".join(parts))
