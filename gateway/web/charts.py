"""The indicator as SVG drawn on the server: no script, no chart library, nothing fetched,
and it prints. Each bar is a weighted share with its 95% interval as a whisker; a suppressed
cell is written "not enough answers" (never a zero-length bar) and a flagged one is marked.
The same numbers are in the accessible table next to every chart."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from markupsafe import Markup, escape

LABEL_W, BAR_W, ROW_H, PAD = 190, 300, 26, 8
FLAG = "†"


@dataclass(frozen=True)
class Bar:
    label: str
    estimate: float | None  # 0..1; None when suppressed
    low: float | None
    high: float | None
    n: int
    status: str

    @property
    def suppressed(self) -> bool:
        return self.status.startswith("suppressed") or self.estimate is None

    @property
    def flagged(self) -> bool:
        return self.status == "flagged"


def bar_of(label: str, cell: dict[str, Any]) -> Bar:
    return Bar(label, cell.get("estimate"), cell.get("ci_low"), cell.get("ci_high"),
               int(cell.get("n") or 0), str(cell.get("status") or ""))


def bar_chart(title: str, bars: list[Bar], chart_id: str) -> Markup:
    """Horizontal bars 0-100% with interval whiskers; role=img with a title for readers
    (the table beside it has the numbers)."""
    width = LABEL_W + BAR_W + 110
    height = PAD * 2 + 18 + ROW_H * len(bars) + 16
    x0 = LABEL_W

    def x(share: float) -> float:
        return round(x0 + BAR_W * max(0.0, min(1.0, share)), 1)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" id="{escape(chart_id)}" '
           f'viewBox="0 0 {width} {height}" width="100%" role="img" '
           f'aria-labelledby="{escape(chart_id)}-t">',
           f'<title id="{escape(chart_id)}-t">{escape(title)}</title>',
           f'<text x="{PAD}" y="{PAD + 12}" class="ct">{escape(title)}</text>']
    top = PAD + 18
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<line x1="{x(tick)}" y1="{top}" x2="{x(tick)}" '
                   f'y2="{top + ROW_H * len(bars)}" class="grid"/>')
        out.append(f'<text x="{x(tick)}" y="{top + ROW_H * len(bars) + 12}" '
                   f'class="tick" text-anchor="middle">{int(tick * 100)}%</text>')
    for k, bar in enumerate(bars):
        y = top + ROW_H * k
        mid = y + ROW_H / 2
        out.append(f'<g class="bar{" suppressed" if bar.suppressed else ""}'
                   f'{" flagged" if bar.flagged else ""}" data-label="{escape(bar.label)}">')
        out.append(f'<text x="{LABEL_W - 6}" y="{mid + 4}" text-anchor="end" '
                   f'class="lbl">{escape(bar.label)}</text>')
        if bar.suppressed:
            out.append(f'<text x="{x0 + 4}" y="{mid + 4}" class="na">not enough answers'
                       f' (n={bar.n})</text>')
        else:
            est = bar.estimate or 0.0
            out.append(f'<rect x="{x0}" y="{y + 5}" width="{x(est) - x0}" '
                       f'height="{ROW_H - 10}" class="fill"/>')
            if bar.low is not None and bar.high is not None:
                out.append(f'<line x1="{x(bar.low)}" y1="{mid}" x2="{x(bar.high)}" y2="{mid}" '
                           'class="ci"/>')
                for end in (bar.low, bar.high):
                    out.append(f'<line x1="{x(end)}" y1="{mid - 5}" x2="{x(end)}" '
                               f'y2="{mid + 5}" class="ci"/>')
            mark = f" {FLAG}" if bar.flagged else ""
            out.append(f'<text x="{x0 + BAR_W + 6}" y="{mid + 4}" class="val">'
                       f'{est * 100:.0f}%{mark}</text>')
        out.append("</g>")
    out.append("</svg>")
    return Markup("".join(out))


COL_W, COL_GAP, PLOT_H = 26, 6, 140


def count_chart(title: str, points: list[tuple[str, int]], chart_id: str) -> Markup:
    """Counts over time (completions per day) as columns, each labelled with its count,
    on a y axis from 0 to the largest count; role=img with a title (the table beside it
    has the numbers)."""
    top = max((n for _, n in points), default=0)
    left, head, foot = 40, PAD + 40, 30  # head: the title, then room for the top count
    width = max(BAR_W + LABEL_W, left + PAD + (COL_W + COL_GAP) * len(points))
    height = head + PLOT_H + foot
    base = head + PLOT_H
    every = max(1, len(points) // 12)  # at most about a dozen day labels under the axis

    def y(n: float) -> float:
        return round(base - PLOT_H * (n / top if top else 0.0), 1)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart counts" '
           f'id="{escape(chart_id)}" viewBox="0 0 {width} {height}" width="100%" '
           f'role="img" aria-labelledby="{escape(chart_id)}-t">',
           f'<title id="{escape(chart_id)}-t">{escape(title)}</title>',
           f'<text x="{PAD}" y="{PAD + 12}" class="ct">{escape(title)}</text>',
           f'<line x1="{left}" y1="{base}" x2="{width - PAD}" y2="{base}" class="grid"/>']
    for tick in sorted({0, top // 2, top} if top else {0}):
        out.append(f'<text x="{left - 4}" y="{y(tick) + 4}" class="tick" '
                   f'text-anchor="end">{tick}</text>')
    if not points:
        out.append(f'<text x="{left + 6}" y="{base - 8}" class="na">none yet</text>')
    for k, (label, n) in enumerate(points):
        x = left + COL_GAP + (COL_W + COL_GAP) * k
        out.append(f'<g class="col" data-label="{escape(label)}" data-n="{n}">')
        out.append(f'<rect x="{x}" y="{y(n)}" width="{COL_W}" height="{round(base - y(n), 1)}"'
                   ' class="fill"/>')
        out.append(f'<text x="{x + COL_W / 2}" y="{y(n) - 3}" class="val" '
                   f'text-anchor="middle">{n}</text>')
        if k % every == 0:
            out.append(f'<text x="{x + COL_W / 2}" y="{base + 14}" class="tick" '
                       f'text-anchor="middle">{escape(label[5:])}</text>')
        out.append("</g>")
    out.append("</svg>")
    return Markup("".join(out))
