"""The overview's charts as inline SVG, drawn on the server: no charting library in the page.

Colours come from CSS classes (`series-completed`, ...), so the charts follow
the light or dark theme; every chart has a text title and a table fallback
in the page for screen readers.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from mq_worker.dashboard.queries import MinuteStats

WIDTH, HEIGHT, PAD = 600, 150, 28
OUTCOMES = ("completed", "crashed", "cancelled", "rejected")


def _frame(title: str, body: str, top: str) -> str:
    return (f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
            f'aria-label="{escape(title)}" preserveAspectRatio="none">'
            f"<title>{escape(title)}</title>"
            f'<line class="axis" x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH}" '
            f'y2="{HEIGHT - PAD}"/>'
            f'<text class="tick" x="2" y="12">{escape(top)}</text>'
            f'<text class="tick" x="{PAD}" y="{HEIGHT - 8}">-60 min</text>'
            f'<text class="tick" x="{WIDTH - 40}" y="{HEIGHT - 8}">now</text>'
            f"{body}</svg>")


def outcome_bars(minutes: Sequence[MinuteStats]) -> str:
    """Runs ended per minute, stacked by outcome."""
    peak = max((sum(m.outcomes.values()) for m in minutes), default=0) or 1
    step = (WIDTH - PAD) / max(len(minutes), 1)
    usable = HEIGHT - 2 * PAD
    parts = []
    for index, minute in enumerate(minutes):
        y = float(HEIGHT - PAD)
        for outcome in OUTCOMES:
            count = minute.outcomes.get(outcome, 0)
            if not count:
                continue
            height = usable * count / peak
            y -= height
            parts.append(
                f'<rect class="series-{outcome}" x="{PAD + index * step:.1f}" y="{y:.1f}" '
                f'width="{max(step - 1, 1):.1f}" height="{height:.1f}">'
                f"<title>{count} {outcome}</title></rect>")
    return _frame("Runs ended per minute by outcome", "".join(parts), f"{peak}/min")


def percentile_lines(minutes: Sequence[MinuteStats], what: str) -> str:
    """p50 and p99 per minute of `what` ("delay" or "duration"), in seconds."""
    p50 = [getattr(m, f"{what}_p50") for m in minutes]
    p99 = [getattr(m, f"{what}_p99") for m in minutes]
    peak = max((v for v in p99 + p50 if v is not None), default=0.0) or 1.0
    step = (WIDTH - PAD) / max(len(minutes) - 1, 1)
    usable = HEIGHT - 2 * PAD

    def path(values: list[float | None], name: str) -> str:
        points = [f"{PAD + i * step:.1f},{HEIGHT - PAD - usable * v / peak:.1f}"
                  for i, v in enumerate(values) if v is not None]
        if not points:
            return ""
        dots = "".join(f'<circle class="series-{name}" cx="{p.split(",")[0]}" '
                       f'cy="{p.split(",")[1]}" r="2"/>' for p in points)
        return f'<polyline class="line-{name}" points="{" ".join(points)}"/>{dots}'

    title = "Start delay" if what == "delay" else "Run duration"
    return _frame(f"{title} per minute, p50 and p99 (seconds)",
                  path(p99, "p99") + path(p50, "p50"), _seconds(peak))


def _seconds(value: float) -> str:
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"


def seconds(value: float | None) -> str:
    return "-" if value is None else _seconds(value)
