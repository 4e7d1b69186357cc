"""A line chart as an SVG document, written with the standard library only.

The learning curve every run saves (``learning_curve.svg``). Why not matplotlib: importing
and rendering it costs ~0.5 s per run here, 5% of a whole CartPole run; an SVG is text, a
few kB, opens in any browser, editor or notebook and scales without blur.

Layout: a ``width × height`` canvas; the plot box leaves room for the title (top), the
x-axis label and tick labels (bottom) and the y tick labels (left). A data point ``(x, y)``
maps linearly onto the box::

    px = left + (x − x_lo) / (x_hi − x_lo) · box_width
    py = top + (y_hi − y) / (y_hi − y_lo) · box_height

with ``[x_lo, x_hi]``, ``[y_lo, y_hi]`` the data's range widened by 2% (x) and 5% (y) on
each side, as matplotlib's default margins (a range of one value by 5% of it, or 1); grid
lines and labels at the "nice" values (1, 2 or 5 × 10ᵏ apart) inside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

__all__ = ["Series", "axis_range", "line_chart_svg", "nice_ticks"]

Series = tuple[str, Sequence[float], Sequence[float]]
"""One line: ``(label, xs, ys)``, finite values, ``len(xs) == len(ys)``."""

# matplotlib's "tab10", so the curves look like the docs' other figures.
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 20, 36, 52  # margins (px) around the plot box
_MARKERS_BELOW = 30  # points per series under which each point also gets a dot


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """About ``target`` evenly spaced round values covering ``[lo, hi]`` (``lo <= hi``).

    The step is 1, 2 or 5 × 10ᵏ; the first tick is ≤ ``lo`` and the last ≥ ``hi``.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"need finite lo <= hi, got {lo}, {hi}")
    if lo == hi:  # one value: widened as an axis of one value is
        lo, hi = axis_range((lo,), 0.0)
    raw = (hi - lo) / max(target - 1, 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    return [k * step for k in range(first, last + 1)]


def axis_range(values: Sequence[float], margin: float) -> tuple[float, float]:
    """``(lo, hi)`` of ``values`` widened by ``margin`` of their span on each side (a single
    value by 5% of itself, or by 1 if it is 0)."""
    lo, hi = min(values), max(values)
    pad = (hi - lo) * margin if hi > lo else (abs(lo) * 0.05 or 1.0)
    return lo - pad, hi + pad


def _label(value: float) -> str:
    """A tick label: ``200k`` for 200,000, ``1.5M``, ``-0.25``; no float noise."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= scale and value % (scale / 10) == 0:
            return f"{value / scale:g}{suffix}"
    return f"{round(value, 10):g}"


def _text(x: float, y: float, s: str, **attrs: str) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in attrs.items())
    return f'<text x="{x:.1f}" y="{y:.1f}"{extra}>{escape(s)}</text>'


def line_chart_svg(series: Sequence[Series], *, title: str, xlabel: str, ylabel: str,
                   note: str | None = None, width: int = 700, height: int = 420) -> str:
    """The SVG document of one chart: a line per series (dots too when short), grid lines at
    the ticks, a legend when there are several series, ``note`` in the middle (e.g. why a
    series is missing). Series without points are left out.

    Raises:
        ValueError: a series with ``len(xs) != len(ys)`` or a non-finite value.
    """
    for label, xs, ys in series:
        if len(xs) != len(ys):
            raise ValueError(f"series {label!r}: {len(xs)} x values for {len(ys)} y values")
        if not all(math.isfinite(v) for v in (*xs, *ys)):
            raise ValueError(f"series {label!r} holds NaN or inf")
    drawn = [s for s in series if len(s[1])]
    xs_all = [x for _, xs, _ in drawn for x in xs] or [0.0, 1.0]
    ys_all = [y for _, _, ys in drawn for y in ys] or [0.0, 1.0]
    (x_lo, x_hi), (y_lo, y_hi) = axis_range(xs_all, 0.02), axis_range(ys_all, 0.05)
    xt = [t for t in nice_ticks(x_lo, x_hi, 8) if x_lo <= t <= x_hi]
    yt = [t for t in nice_ticks(y_lo, y_hi, 8) if y_lo <= t <= y_hi]
    box_w, box_h = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM

    def px(x: float) -> float:
        return _LEFT + (x - x_lo) / (x_hi - x_lo) * box_w

    def py(y: float) -> float:
        return _TOP + (y_hi - y) / (y_hi - y_lo) * box_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           _text(width / 2, 22, title, text_anchor="middle", font_size="14")]
    for x in xt:
        out.append(f'<line x1="{px(x):.1f}" y1="{_TOP}" x2="{px(x):.1f}" y2="{_TOP + box_h}" '
                   'stroke="#ddd"/>')
        out.append(_text(px(x), _TOP + box_h + 16, _label(x), text_anchor="middle"))
    for y in yt:
        out.append(f'<line x1="{_LEFT}" y1="{py(y):.1f}" x2="{_LEFT + box_w}" y2="{py(y):.1f}" '
                   'stroke="#ddd"/>')
        out.append(_text(_LEFT - 6, py(y) + 4, _label(y), text_anchor="end"))
    out.append(f'<rect x="{_LEFT}" y="{_TOP}" width="{box_w}" height="{box_h}" fill="none" '
               'stroke="#444"/>')
    out.append(_text(_LEFT + box_w / 2, height - 12, xlabel, text_anchor="middle"))
    out.append(_text(16, _TOP + box_h / 2, ylabel, text_anchor="middle",
                     transform=f"rotate(-90 16 {_TOP + box_h / 2:.1f})"))
    for i, (label, xs, ys) in enumerate(drawn):
        color = _COLORS[i % len(_COLORS)]
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
        out.append(f'<polyline class="series" data-label="{escape(label)}" points="{points}" '
                   f'fill="none" stroke="{color}" stroke-width="1.5"/>')
        if len(xs) < _MARKERS_BELOW:
            out.extend(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"/>'
                       for x, y in zip(xs, ys))
        if len(drawn) > 1:  # bottom right: learning curves rise, that corner stays empty
            lx, ly = _LEFT + box_w - 170, _TOP + box_h - 10 - 16 * (len(drawn) - 1 - i)
            out.append(f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 20}" y2="{ly - 4}" '
                       f'stroke="{color}" stroke-width="2"/>')
            out.append(_text(lx + 26, ly, label, font_size="11"))
    if note:
        out.append(_text(_LEFT + box_w / 2, _TOP + box_h / 2, note, text_anchor="middle"))
    out.append("</svg>\n")
    return "\n".join(out)
