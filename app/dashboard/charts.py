"""Charts as inline SVG built on the server: no JavaScript, no fonts or files to fetch, a millisecond each.

Every chart scales to its container (``viewBox``, width from the stylesheet), carries a ``<title>`` and an
``aria-label`` for screen readers, and takes its colours from CSS classes (``s0``…``s7``), so the page's
Content-Security-Policy needs no inline styles. Labels are escaped: ids and names can come from users.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from markupsafe import Markup, escape

W, H = 640, 240  # viewBox of a line chart; wide charts (bars, distributions) take WIDE
WIDE = 960
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 28, 40  # plot margins inside the viewBox
PALETTE = 8  # CSS classes s0..s7
MAX_DOTS = 300  # points drawn per distribution row (the box summarises all of them)


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[tuple[float, float | None]]  # (x, y); None leaves a gap


def _num(value: float) -> str:
    """A coordinate with one decimal (keeps the markup small)."""
    return f"{value:.1f}"


def fmt(value: float) -> str:
    """A tick or value label: short, with SI-free magnitudes people read at a glance."""
    if value == 0:
        return "0"
    mag = abs(value)
    if mag >= 1e6:
        return f"{value / 1e6:.3g}M"
    if mag >= 1e4:
        return f"{value / 1e3:.3g}k"
    if mag >= 100:
        return f"{value:.0f}"
    if mag >= 1:
        return f"{value:.3g}"
    return f"{value:.2g}"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2 or 5 times a power of ten apart)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count - 1, 1)
    step = 10 ** math.floor(math.log10(raw))
    ratio = raw / step
    step *= 1 if ratio < 1.5 else 2 if ratio < 3 else 5 if ratio < 7 else 10
    start = math.floor(lo / step) * step
    ticks, value = [], start
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < hi:
        ticks.append(round(value, 12))
    return ticks


def _open(title: str, width: int, height: int, extra: str = "") -> list[str]:
    t = escape(title)
    return [
        f'<svg class="chart{extra}" viewBox="0 0 {width} {height}" role="img" aria-label="{t}" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{t}</title>',
        f'<text class="chart-title" x="{LEFT}" y="16">{t}</text>',
    ]


def _empty(title: str, message: str, width: int = W) -> Markup:
    parts = _open(title, width, 80, " chart-empty")
    parts.append(f'<text class="chart-note" x="{LEFT}" y="52">{escape(message)}</text></svg>')
    return Markup("".join(parts))


def _legend(names: Sequence[str], y: float) -> list[str]:
    out, x = [], float(LEFT)
    for i, name in enumerate(names):
        out.append(
            f'<rect class="s{i % PALETTE} fill" x="{_num(x)}" y="{_num(y - 9)}" width="10" height="10"/>'
            f'<text class="chart-legend" x="{_num(x + 14)}" y="{_num(y)}">{escape(name)}</text>'
        )
        x += 22 + 7 * len(name)
    return out


def _y_axis(ticks: list[float], y_of, x0: float, x1: float) -> list[str]:  # noqa: ANN001 - a small lambda
    out = []
    for t in ticks:
        y = _num(y_of(t))
        out.append(f'<line class="grid" x1="{x0}" x2="{x1}" y1="{y}" y2="{y}"/>')
        out.append(f'<text class="tick" x="{x0 - 6}" y="{y}" text-anchor="end" dy="4">{fmt(t)}</text>')
    return out


def line_chart(
    title: str,
    series: Sequence[Series],
    *,
    x_labels: dict[float, str] | None = None,
    bands: Sequence[tuple[float, float, str]] = (),
    y_min: float | None = None,
) -> Markup:
    """Lines over a shared x axis, one CSS colour per series, with a legend when there are several.

    ``bands`` shade x ranges with a label (e.g. the training phases); ``x_labels`` name tick positions.
    """
    pts = [(x, y) for s in series for x, y in s.points if y is not None and math.isfinite(y)]
    if not pts:
        return _empty(title, "no data recorded")
    # the x axis spans the bands and labelled ticks too: charts of one run share it, whichever epochs
    # recorded the value (the final fit has no validation, so no false-negative rate)
    xs = [p[0] for p in pts] + [x for band in bands for x in band[:2]] + list(x_labels or {})
    ys = [p[1] for p in pts]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    ticks = nice_ticks(min(ys) if y_min is None else min(y_min, min(ys)), max(ys))
    y_lo, y_hi = ticks[0], ticks[-1]
    legend = len(series) > 1
    bottom = H - BOTTOM - (18 if legend else 0)
    x0, x1 = LEFT, W - RIGHT

    def x_of(x: float) -> float:
        return x0 + (x - x_lo) / (x_hi - x_lo) * (x1 - x0)

    def y_of(y: float) -> float:
        return bottom - (y - y_lo) / ((y_hi - y_lo) or 1) * (bottom - TOP)

    parts = _open(title, W, H)
    for start, end, label in bands:
        a, b = x_of(start - 0.5 if start > x_lo else start), x_of(end + 0.5 if end < x_hi else end)
        parts.append(
            f'<rect class="band" x="{_num(a)}" y="{TOP}" width="{_num(max(b - a, 1))}" height="{_num(bottom - TOP)}"/>'
            f'<text class="band-label" x="{_num(a + 4)}" y="{TOP + 12}">{escape(label)}</text>'
        )
    parts += _y_axis(ticks, y_of, x0, x1)
    for x, label in (x_labels or {}).items():
        parts.append(
            f'<text class="tick" x="{_num(x_of(x))}" y="{bottom + 16}" text-anchor="middle">{escape(label)}</text>'
        )
    for i, s in enumerate(series):
        cls = f"s{i % PALETTE}"
        runs: list[list[str]] = [[]]
        for x, y in s.points:
            if y is None or not math.isfinite(y):
                runs.append([])
                continue
            runs[-1].append(f"{_num(x_of(x))},{_num(y_of(y))}")
            parts.append(
                f'<circle class="{cls} fill" cx="{_num(x_of(x))}" cy="{_num(y_of(y))}" r="2.5">'
                f"<title>{escape(s.name)}: {fmt(y)}</title></circle>"
            )
        parts += [f'<polyline class="{cls} line" points="{" ".join(r)}"/>' for r in runs if len(r) > 1]
    if legend:
        parts += _legend([s.name for s in series], H - 10)
    parts.append("</svg>")
    return Markup("".join(parts))


def bar_chart(
    title: str, bars: Sequence[tuple[str, float]], *, ticks: dict[int, str] | None = None, width: int = WIDE
) -> Markup:
    """Vertical bars (a count per hour or per day) named in their tooltips; ``ticks`` labels some of them
    on the axis (by position; default: every bar)."""
    if not bars or not any(v for _, v in bars):
        return _empty(title, "nothing recorded in this window", width)
    y_ticks = nice_ticks(0.0, max(v for _, v in bars))
    top_value = y_ticks[-1] or 1.0
    bottom, x0, x1 = H - BOTTOM, LEFT, width - RIGHT
    step = (x1 - x0) / len(bars)
    parts = _open(title, width, H)
    parts += _y_axis(y_ticks, lambda v: bottom - v / top_value * (bottom - TOP), x0, x1)
    for i, (label, value) in enumerate(bars):
        h = value / top_value * (bottom - TOP)
        x = x0 + i * step
        parts.append(
            f'<rect class="s0 fill bar" x="{_num(x + step * 0.1)}" y="{_num(bottom - h)}" '
            f'width="{_num(max(step * 0.8, 0.5))}" height="{_num(h)}"><title>{escape(label)}: {fmt(value)}</title></rect>'
        )
        tick = label if ticks is None else ticks.get(i)
        if tick:
            parts.append(
                f'<text class="tick" x="{_num(x + step / 2)}" y="{bottom + 16}" text-anchor="middle">{escape(tick)}</text>'
            )
    parts.append("</svg>")
    return Markup("".join(parts))


def distribution_chart(
    title: str,
    groups: Sequence[tuple[str, Sequence[float]]],
    *,
    marker: tuple[float, str] | None = None,
    width: int = WIDE,
) -> Markup:
    """One row per group: every value as a dot (deterministic jitter) over a box of its quartiles.

    Made for scores: the user's positives in the first row, each negative source below, so negatives far
    left of the positives (easy) and among them (hard, or false negatives) are seen at once. ``marker``
    draws a labelled vertical line (e.g. the "easy" threshold).
    """
    rows = [(name, np.asarray(values, dtype=np.float64)) for name, values in groups]
    rows = [(n, v[np.isfinite(v)]) for n, v in rows]
    every = np.concatenate([v for _, v in rows]) if rows else np.zeros(0)
    if every.size == 0:
        return _empty(title, "no scores to show", width)
    lo, hi = float(every.min()), float(every.max())
    if marker is not None and math.isfinite(marker[0]):
        lo, hi = min(lo, marker[0]), max(hi, marker[0])
    ticks = nice_ticks(lo, hi, 6)
    lo, hi = ticks[0], ticks[-1]
    label_w, row_h, top = 150, 34, TOP + 8
    bottom = top + row_h * len(rows)
    x0, x1 = label_w, width - RIGHT

    def x_of(v: float) -> float:
        return x0 + (v - lo) / ((hi - lo) or 1) * (x1 - x0)

    parts = _open(title, width, int(bottom + 34))
    for t in ticks:
        x = _num(x_of(t))
        parts.append(f'<line class="grid" x1="{x}" x2="{x}" y1="{top}" y2="{bottom}"/>')
        parts.append(f'<text class="tick" x="{x}" y="{bottom + 16}" text-anchor="middle">{fmt(t)}</text>')
    rng = np.random.default_rng(0)
    for i, (name, values) in enumerate(rows):
        parts += _distribution_row(name, values, f"s{i % PALETTE}", top + row_h * i + row_h / 2, label_w, x_of, rng)
    if marker is not None and math.isfinite(marker[0]):
        x = _num(x_of(marker[0]))
        parts.append(
            f'<line class="marker" x1="{x}" x2="{x}" y1="{top - 6}" y2="{bottom}"/>'
            f'<text class="marker-label" x="{x}" y="{top - 8}" text-anchor="middle">{escape(marker[1])}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def _distribution_row(name: str, values: np.ndarray, cls: str, cy: float, label_w: float, x_of,  # noqa: ANN001
                      rng: np.random.Generator) -> list[str]:
    """One group of ``distribution_chart`` centred at height ``cy``: its label, then (when it has values)
    a whisker from min to max, the quartile box with the median, and up to MAX_DOTS jittered dots."""
    parts = [f'<text class="row-label" x="{label_w - 8}" y="{_num(cy)}" text-anchor="end" dy="4">'
             f"{escape(name)} ({values.size})</text>"]
    if values.size == 0:
        return parts
    q1, med, q3 = np.quantile(values, [0.25, 0.5, 0.75])
    parts.append(
        f'<line class="{cls} line" x1="{_num(x_of(values.min()))}" x2="{_num(x_of(values.max()))}" '
        f'y1="{_num(cy)}" y2="{_num(cy)}"/>'
        f'<rect class="{cls} box" x="{_num(x_of(q1))}" y="{_num(cy - 9)}" '
        f'width="{_num(max(x_of(q3) - x_of(q1), 1))}" height="18">'
        f"<title>{escape(name)}: median {fmt(med)}, quartiles {fmt(q1)} to {fmt(q3)}</title></rect>"
        f'<line class="median" x1="{_num(x_of(med))}" x2="{_num(x_of(med))}" '
        f'y1="{_num(cy - 9)}" y2="{_num(cy + 9)}"/>'
    )
    shown = values if values.size <= MAX_DOTS else rng.choice(values, MAX_DOTS, replace=False)
    jitter = rng.uniform(-7, 7, shown.size)
    parts += [
        f'<circle class="{cls} fill dot" cx="{_num(x_of(v))}" cy="{_num(cy + j)}" r="2"/>'
        for v, j in zip(shown.tolist(), jitter.tolist(), strict=True)
    ]
    return parts
