"""Dependency-free, self-contained HTML reports (inline CSS + inline SVG, no JavaScript).

The report is written to object storage next to the job's outputs and must open offline, so
nothing is fetched from a CDN and no plotting library is needed: every figure is an inline
``<svg>`` element (each one valid XML on its own) drawn with a colour-blind-friendly palette
(Okabe-Ito for categories, a viridis approximation for heatmaps).

Output is deterministic: the same calls with the same inputs give the same bytes (no
timestamps, no random ids; subsampling uses a fixed seed).

    rep = Report("Data valuation", subtitle="run 2024-01-01")
    rep.key_values({"run id": run_id, "rows": n})
    rep.histogram({"clean": v[~noise], "injected noise": v[noise]}, title="Value by origin")
    fpr, tpr, auc = roc_curve(-v, noise)
    rep.line_plot({f"value (AUC {auc:.3f})": (fpr, tpr)}, xlabel="FPR", ylabel="TPR")
    rep.write("s3://bucket/run/report.html")
"""
from __future__ import annotations

import html as _html
import json
import math
import os
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

__all__ = ["Report", "roc_curve", "PALETTE"]

# Okabe-Ito, ordered so that the first colours are the most distinct on white.
PALETTE: tuple[str, ...] = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7",
                            "#56B4E9", "#7F7F7F", "#F0E442")
_DASHES = ("", "6 3", "2 2", "8 3 2 3")

# viridis, sampled at 9 evenly spaced points
_VIRIDIS = np.array([(68, 1, 84), (71, 44, 122), (59, 82, 139), (44, 114, 142), (33, 145, 140),
                     (39, 173, 129), (94, 201, 98), (170, 220, 50), (253, 231, 37)], dtype=float)

_CHAR_W = 6.2           # approximate width of one character at font-size 11 (px)
_FONT = "system-ui,-apple-system,'Segoe UI',Roboto,'Helvetica Neue',Arial,sans-serif"

_CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f6f7f9;color:#1f2328;font-family:%(font)s;font-size:15px;line-height:1.5}
.container{max-width:1000px;margin:0 auto;padding:28px 32px 48px;background:#fff;min-height:100vh;
box-shadow:0 0 0 1px #e4e6ea}
header{border-bottom:2px solid #0072B2;margin-bottom:20px;padding-bottom:10px}
h1{font-size:28px;margin:0 0 4px;font-weight:650;letter-spacing:-.01em}
.subtitle{color:#57606a;margin:0;font-size:16px}
h2{font-size:21px;margin:34px 0 10px;padding-bottom:4px;border-bottom:1px solid #e4e6ea;font-weight:620}
h3{font-size:17px;margin:24px 0 8px;font-weight:620}
h4,h5,h6{font-size:15px;margin:18px 0 6px}
p{margin:8px 0 12px}
nav.toc{background:#f6f8fa;border:1px solid #e4e6ea;border-radius:6px;padding:8px 16px;margin:0 0 16px;
font-size:14px}
nav.toc ol{margin:4px 0;padding-left:22px}
a{color:#0b62a4;text-decoration:none}
a:hover{text-decoration:underline}
.table-wrap{overflow-x:auto;margin:10px 0 18px}
table{border-collapse:collapse;font-size:13.5px;font-variant-numeric:tabular-nums}
caption{caption-side:top;text-align:left;color:#57606a;font-size:13.5px;padding:0 0 6px}
th,td{padding:5px 12px;border-bottom:1px solid #e4e6ea;text-align:left;vertical-align:top}
thead th{background:#eef1f4;border-bottom:2px solid #d0d7de;font-weight:600;white-space:nowrap}
tbody tr:nth-child(even){background:#f8f9fb}
tbody tr:hover{background:#eef5fb}
td.num,th.num{text-align:right;white-space:nowrap}
td.best{font-weight:700;color:#003f66}
table.kv th{background:none;color:#57606a;font-weight:500;white-space:nowrap;padding-right:24px}
table.kv td{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px;
word-break:break-all}
table.kv tbody tr:nth-child(even){background:none}
figure{margin:14px 0 24px;text-align:center}
figure svg{max-width:100%%;height:auto;display:inline-block}
figcaption{color:#57606a;font-size:13px;margin-top:2px}
footer{margin-top:40px;color:#8c959f;font-size:12px;border-top:1px solid #e4e6ea;padding-top:8px}
""" % {"font": _FONT}


# --------------------------------------------------------------------------- small helpers
def _e(s: Any) -> str:
    """HTML/XML-escape any value's ``str``."""
    return _html.escape(str(s), quote=True)


def _f(x: float) -> str:
    """Fixed-precision coordinate for SVG (deterministic, short)."""
    v = round(float(x), 2)
    if v == 0:
        v = 0.0
    s = f"{v:.2f}".rstrip("0").rstrip(".")
    return s or "0"


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _fmt_value(v: Any, number_format: str = "{:.4f}") -> str:
    """Plain-text rendering of a table cell (not escaped)."""
    if v is None:
        return "\u2014"
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        x = float(v)
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return "\u221e" if x > 0 else "\u2212\u221e"
        try:
            return number_format.format(x)
        except (ValueError, IndexError, KeyError):
            return repr(x)
    if isinstance(v, (dict, list, tuple)):
        try:
            return json.dumps(v, default=str, ensure_ascii=False)
        except (TypeError, ValueError):
            return str(v)
    return str(v)


def _truncate(s: str, n: int) -> str:
    return s if len(s) <= n else s[: max(1, n - 1)] + "\u2026"


def _text_w(s: str, size: float = 11.0) -> float:
    return len(s) * _CHAR_W * size / 11.0


def _as_float(a: Any) -> np.ndarray:
    try:
        arr = np.asarray(a, dtype=float)
    except (TypeError, ValueError):
        arr = np.array([], dtype=float)
    return arr.ravel()


def _viridis(t: np.ndarray | float) -> list[str]:
    t = np.clip(np.atleast_1d(np.asarray(t, dtype=float)), 0.0, 1.0)
    pos = t * (len(_VIRIDIS) - 1)
    i = np.minimum(np.floor(pos).astype(int), len(_VIRIDIS) - 2)
    w = (pos - i)[:, None]
    rgb = np.rint(_VIRIDIS[i] * (1 - w) + _VIRIDIS[i + 1] * w).astype(int)
    return ["#%02x%02x%02x" % tuple(c) for c in rgb]


def _luminance(hex_colour: str) -> float:
    r, g, b = (int(hex_colour[k:k + 2], 16) / 255 for k in (1, 3, 5))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


# --------------------------------------------------------------------------- ticks
def _nice_step(raw: float) -> float:
    """The step of the form {1, 2, 5} x 10^k closest (in ratio) to ``raw``."""
    if not (raw > 0 and math.isfinite(raw)):
        return 1.0
    exp = math.floor(math.log10(raw))
    base = 10.0 ** exp
    return min((m * base for m in (1.0, 2.0, 5.0, 10.0)),
               key=lambda st: (round(abs(math.log(st / raw)), 9), st))


def _expand_degenerate(lo: float, hi: float) -> tuple[float, float]:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return 0.0, 1.0
    if lo > hi:
        lo, hi = hi, lo
    if hi - lo <= 1e-12 * max(1.0, abs(lo), abs(hi)):
        d = 0.5 if lo == 0 else abs(lo) * 0.1
        lo, hi = lo - d, hi + d
    return lo, hi


def _nice_ticks(lo: float, hi: float, target: int = 6) -> tuple[list[float], float]:
    """Ticks on a 1-2-5 grid lying inside ``[lo, hi]`` and the grid step."""
    lo, hi = _expand_degenerate(lo, hi)
    step = _nice_step((hi - lo) / max(1, target - 1))
    k0 = math.ceil(lo / step - 1e-9)
    k1 = math.floor(hi / step + 1e-9)
    ticks = [float(f"{k * step:.12g}") + 0.0 for k in range(k0, k1 + 1)]
    return ticks, step


def _nice_bounds(lo: float, hi: float, target: int = 6) -> tuple[float, float, list[float], float]:
    """Expand ``[lo, hi]`` outwards to the enclosing 1-2-5 ticks."""
    lo, hi = _expand_degenerate(lo, hi)
    step = _nice_step((hi - lo) / max(1, target - 1))
    k0 = math.floor(lo / step + 1e-9)
    k1 = math.ceil(hi / step - 1e-9)
    ticks = [float(f"{k * step:.12g}") + 0.0 for k in range(k0, k1 + 1)]
    return ticks[0], ticks[-1], ticks, step


def _tick_formatter(ticks: Sequence[float], step: float) -> Callable[[float], str]:
    big = max((abs(t) for t in ticks), default=0.0)
    if big >= 1e4:
        for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if big >= scale * (10 if scale == 1e3 else 1):
                break
        d = max(0, min(6, -math.floor(math.log10(step / scale) + 1e-9)))

        def fmt(t: float) -> str:
            return "0" if abs(t) < step * 1e-6 else f"{t / scale:.{d}f}{suffix}".replace("-", "\u2212")
        return fmt
    if step < 1e-4:
        return lambda t: "0" if abs(t) < step * 1e-6 else f"{t:.2g}".replace("-", "\u2212")
    d = max(0, min(8, -math.floor(math.log10(step) + 1e-9)))

    def fmt(t: float) -> str:
        s = f"{t:.{d}f}"
        return s.lstrip("-") if float(s) == 0 else s.replace("-", "\u2212")
    return fmt


def _fmt_compact(v: float) -> str:
    """About three significant digits, k/M/G suffixes for large magnitudes (value labels)."""
    if not math.isfinite(v):
        return "n/a"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e4:
        for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if a >= scale:
                s = _fmt_compact(v / scale) + suffix
                break
    elif a >= 1e-3:
        d = max(0, 2 - math.floor(math.log10(a)))
        s = f"{v:.{d}f}"
        if "." in s:
            s = s.rstrip("0").rstrip(".")
    else:
        s = f"{v:.2e}"
    return s.replace("-", "\u2212")


def _fmt_log_tick(v: float) -> str:
    if 1e-3 <= v < 1e4:
        return f"{v:g}"
    if 1e4 <= v < 1e15:
        for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if v >= scale:
                return f"{v / scale:g}{suffix}"
    return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e").replace("e+", "e")


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values for a log10 axis spanning ``[10**lo, 10**hi]`` (arguments in log10 space)."""
    out = [10.0 ** k for k in range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1)]
    if len(out) < 3:
        out = []
        for k in range(math.floor(lo) - 1, math.ceil(hi) + 1):
            for m in (1, 2, 5):
                v = m * 10.0 ** k
                if lo - 1e-9 <= math.log10(v) <= hi + 1e-9:
                    out.append(v)
    if len(out) > 9:
        stride = math.ceil(len(out) / 8)
        out = out[::stride]
    return out


class _Axis:
    """Maps data values to pixels (linear or log10)."""

    def __init__(self, lo: float, hi: float, p0: float, p1: float, log: bool = False):
        self.lo, self.hi, self.p0, self.p1, self.log = lo, hi, p0, p1, log

    def __call__(self, v: Any) -> np.ndarray:
        v = np.asarray(v, dtype=float)
        if self.log:
            with np.errstate(divide="ignore", invalid="ignore"):
                v = np.log10(v)
        t = (v - self.lo) / (self.hi - self.lo)
        return self.p0 + t * (self.p1 - self.p0)


def _axis_from_data(vals: np.ndarray, log: bool, p0: float, p1: float, pad: float,
                    nice: bool) -> tuple[_Axis, list[float], Callable[[float], str]]:
    """Build an axis over finite ``vals`` (already filtered to > 0 when ``log``)."""
    if vals.size == 0:
        lo, hi = (0.0, 1.0)
    else:
        lo, hi = float(vals.min()), float(vals.max())
    if log:
        llo, lhi = (math.log10(lo), math.log10(hi)) if vals.size else (0.0, 1.0)
        if lhi - llo < 1e-9:
            llo, lhi = llo - 0.5, lhi + 0.5
        span = lhi - llo
        llo, lhi = llo - pad * span, lhi + pad * span
        return _Axis(llo, lhi, p0, p1, log=True), _log_ticks(llo, lhi), _fmt_log_tick
    lo, hi = _expand_degenerate(lo, hi)
    if nice:
        lo, hi, ticks, step = _nice_bounds(lo, hi)
    else:
        span = hi - lo
        lo, hi = lo - pad * span, hi + pad * span
        ticks, step = _nice_ticks(lo, hi)
    return _Axis(lo, hi, p0, p1), ticks, _tick_formatter(ticks, step)


# --------------------------------------------------------------------------- pure numerics
def _histogram_counts(groups: Mapping[str, Any], bins: int = 40, density: bool = True
                      ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """Shared-bin histograms of several groups.

    Non-finite values are dropped. Returns ``(edges, counts, heights, dropped)`` where ``counts``
    maps each group to its integer bin counts, ``heights`` to the plotted heights (counts, or the
    density ``count / (n * bin width)`` when ``density``) and ``dropped`` is the number of
    non-finite values left out. Edges are ``bins`` equal bins from the smallest to the largest
    finite value, as ``numpy.histogram`` makes them (a constant sample ``v`` gets a unit range
    with ``v`` at the centre of the middle bin). With no finite value at all, ``edges`` is empty.
    """
    bins = max(1, int(bins))
    clean: dict[str, np.ndarray] = {}
    dropped = 0
    for name, v in groups.items():
        a = _as_float(v)
        ok = np.isfinite(a)
        dropped += int(a.size - ok.sum())
        clean[name] = a[ok]
    allv = np.concatenate(list(clean.values())) if clean else np.array([])
    if allv.size == 0:
        return np.array([]), {k: np.array([], dtype=int) for k in clean}, \
            {k: np.array([]) for k in clean}, dropped
    lo, hi = float(allv.min()), float(allv.max())
    if lo == hi:  # constant sample: unit range with the value at the centre of the middle bin
        w = 1.0 / bins
        edges = lo + (np.arange(bins + 1) - bins // 2 - 0.5) * w
    else:
        edges = np.linspace(lo, hi, bins + 1)
    counts, heights = {}, {}
    for name, a in clean.items():
        c, _ = np.histogram(a, bins=edges)
        counts[name] = c.astype(int)
        if density:
            n = c.sum()
            heights[name] = c / (n * np.diff(edges)) if n > 0 else np.zeros(bins)
        else:
            heights[name] = c.astype(float)
    return edges, counts, heights, dropped


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC curve of ``scores`` (higher = more positive) against binary ``labels``.

    Like ``sklearn.metrics.roc_curve`` with ``drop_intermediate=False``: one point per distinct
    score (ties move along a diagonal, i.e. are averaged), starting at (0, 0); the AUC is the
    trapezoidal area, which equals the Mann-Whitney U statistic / (n_pos * n_neg) with ties
    counted as 1/2. Labels are positive where ``> 0`` (so 0/1, -1/1 and booleans all work).
    Pairs with a NaN score are dropped. With no positives or no negatives the undefined rate is
    NaN and so is the AUC.
    """
    s = _as_float(scores)
    y = np.asarray(labels).ravel()
    if y.dtype == bool:
        y = y.astype(float)
    y = np.asarray(y, dtype=float)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    keep = ~np.isnan(s) & ~np.isnan(y)
    s, pos = s[keep], (y[keep] > 0)
    if s.size == 0:
        return np.array([0.0]), np.array([0.0]), float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, pos = s[order], pos[order]
    distinct = np.flatnonzero(np.diff(s)) if s.size > 1 else np.array([], dtype=int)
    idx = np.r_[distinct, s.size - 1]
    tps = np.cumsum(pos, dtype=float)[idx]
    fps = (idx + 1) - tps
    tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = fps / fps[-1] if fps[-1] > 0 else np.full_like(fps, np.nan)
        tpr = tps / tps[-1] if tps[-1] > 0 else np.full_like(tps, np.nan)
    if fps[-1] > 0 and tps[-1] > 0:
        auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
    else:
        auc = float("nan")
    return fpr, tpr, auc


# --------------------------------------------------------------------------- SVG figure
class _Fig:
    """One SVG figure: a plot rectangle inside margins, a title and an optional legend row."""

    def __init__(self, fid: str, title: str = "", width: float = 640, height: float = 360,
                 left: float = 64, right: float = 18, top: float = 14, bottom: float = 50,
                 legend: Sequence[tuple[str, str, str]] = ()):
        self.fid, self.title, self.w = fid, title, width
        self.parts: list[str] = []
        top = top + (24 if title else 0)
        self.legend_rows = self._layout_legend(list(legend), width - 24)
        top += 18 * len(self.legend_rows) + (4 if self.legend_rows else 0)
        self.legend_top = top - 18 * len(self.legend_rows) - 2
        self.h = height + max(0, len(self.legend_rows) - 1) * 18
        self.x0, self.x1 = left, width - right
        self.y0, self.y1 = top, self.h - bottom  # plot top / bottom in px

    # legend items: (label, colour, kind) with kind in {"rect", "line", "dot"} or "line:<dash>"
    @staticmethod
    def _layout_legend(items: list[tuple[str, str, str]], max_w: float) -> list[list[tuple]]:
        rows: list[list[tuple]] = []
        row: list[tuple] = []
        row_w = 0.0
        for label, colour, kind in items:
            label = _truncate(str(label), 48)
            w = 22 + _text_w(label, 11.5) + 16
            if row and row_w + w > max_w:
                rows.append(row)
                row, row_w = [], 0.0
            row.append((label, colour, kind, w))
            row_w += w
        if row:
            rows.append(row)
        if len(rows) > 4:  # keep it bounded
            rows = rows[:4]
            rows[-1] = rows[-1][:-1] + [("\u2026", "#ffffff", "none", 30)]
        return rows

    def add(self, s: str) -> None:
        self.parts.append(s)

    def svg(self) -> str:
        head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_f(self.w)}" height="{_f(self.h)}" '
                f'viewBox="0 0 {_f(self.w)} {_f(self.h)}" font-family="{_e(_FONT)}" font-size="11" '
                f'role="img" aria-label="{_e(self.title or "figure")}">')
        out = [head, f'<rect x="0" y="0" width="{_f(self.w)}" height="{_f(self.h)}" fill="#ffffff"/>']
        if self.title:
            out.append(f'<text x="{_f(self.w / 2)}" y="22" text-anchor="middle" font-size="14" '
                       f'font-weight="600" fill="#1f2328">{_e(_truncate(self.title, 90))}</text>')
        y = self.legend_top
        for row in self.legend_rows:
            total = sum(it[3] for it in row)
            x = (self.w - total) / 2
            for label, colour, kind, w in row:
                cy = y + 9
                if kind == "rect":
                    out.append(f'<rect x="{_f(x)}" y="{_f(cy - 5)}" width="16" height="10" fill="{colour}" '
                               f'fill-opacity="0.55" stroke="{colour}" stroke-width="1.2"/>')
                elif kind == "dot":
                    out.append(f'<circle cx="{_f(x + 8)}" cy="{_f(cy)}" r="4" fill="{colour}" '
                               f'fill-opacity="0.8"/>')
                elif kind.startswith("line"):
                    dash = kind.split(":", 1)[1] if ":" in kind else ""
                    da = f' stroke-dasharray="{dash}"' if dash else ""
                    out.append(f'<line x1="{_f(x)}" y1="{_f(cy)}" x2="{_f(x + 16)}" y2="{_f(cy)}" '
                               f'stroke="{colour}" stroke-width="2.2"{da}/>')
                out.append(f'<text x="{_f(x + 22)}" y="{_f(cy + 4)}" font-size="11.5" fill="#1f2328">'
                           f'{_e(label)}</text>')
                x += w
            y += 18
        out.extend(self.parts)
        out.append("</svg>")
        return "".join(out)

    def clip(self, pad: float = 0.0) -> str:
        cid = f"{self.fid}-clip"
        self.add(f'<clipPath id="{cid}"><rect x="{_f(self.x0 - pad)}" y="{_f(self.y0 - pad)}" '
                 f'width="{_f(self.x1 - self.x0 + 2 * pad)}" height="{_f(self.y1 - self.y0 + 2 * pad)}"/>'
                 f'</clipPath>')
        return cid

    def axes(self, xa: Optional[_Axis], xticks: Sequence[float], xfmt: Callable[[float], str],
             ya: Optional[_Axis], yticks: Sequence[float], yfmt: Callable[[float], str],
             xlabel: str = "", ylabel: str = "", grid: bool = True) -> None:
        """Grid, frame, ticks, tick labels and axis labels."""
        x0, x1, y0, y1 = self.x0, self.x1, self.y0, self.y1
        g = ['<g class="axes">']
        if ya is not None:
            for t in yticks:
                py = float(ya(t))
                if not (y0 - 0.5 <= py <= y1 + 0.5):
                    continue
                if grid:
                    g.append(f'<line x1="{_f(x0)}" y1="{_f(py)}" x2="{_f(x1)}" y2="{_f(py)}" '
                             f'stroke="#e6e8eb" stroke-width="1"/>')
                g.append(f'<line x1="{_f(x0 - 4)}" y1="{_f(py)}" x2="{_f(x0)}" y2="{_f(py)}" stroke="#57606a"/>')
                g.append(f'<text x="{_f(x0 - 7)}" y="{_f(py + 3.8)}" text-anchor="end" fill="#424a53">'
                         f'{_e(yfmt(t))}</text>')
        if xa is not None:
            for t in xticks:
                px = float(xa(t))
                if not (x0 - 0.5 <= px <= x1 + 0.5):
                    continue
                if grid:
                    g.append(f'<line x1="{_f(px)}" y1="{_f(y0)}" x2="{_f(px)}" y2="{_f(y1)}" '
                             f'stroke="#e6e8eb" stroke-width="1"/>')
                g.append(f'<line x1="{_f(px)}" y1="{_f(y1)}" x2="{_f(px)}" y2="{_f(y1 + 4)}" stroke="#57606a"/>')
                g.append(f'<text x="{_f(px)}" y="{_f(y1 + 16)}" text-anchor="middle" fill="#424a53">'
                         f'{_e(xfmt(t))}</text>')
        g.append(f'<path d="M{_f(x0)},{_f(y0)}V{_f(y1)}H{_f(x1)}" fill="none" stroke="#57606a" '
                 f'stroke-width="1"/>')
        if xlabel:
            g.append(f'<text x="{_f((x0 + x1) / 2)}" y="{_f(y1 + 36)}" text-anchor="middle" font-size="12" '
                     f'fill="#1f2328">{_e(_truncate(xlabel, 90))}</text>')
        if ylabel:
            cy = (y0 + y1) / 2
            g.append(f'<text x="14" y="{_f(cy)}" transform="rotate(-90 14 {_f(cy)})" text-anchor="middle" '
                     f'font-size="12" fill="#1f2328">{_e(_truncate(ylabel, 50))}</text>')
        g.append("</g>")
        self.add("".join(g))

    def no_data(self, msg: str = "no data") -> None:
        self.add(f'<rect x="{_f(self.x0)}" y="{_f(self.y0)}" width="{_f(self.x1 - self.x0)}" '
                 f'height="{_f(self.y1 - self.y0)}" fill="#f6f8fa" stroke="#d0d7de" stroke-dasharray="4 3"/>')
        self.add(f'<text x="{_f((self.x0 + self.x1) / 2)}" y="{_f((self.y0 + self.y1) / 2 + 5)}" '
                 f'text-anchor="middle" font-size="14" fill="#6e7781">{_e(msg)}</text>')


# --------------------------------------------------------------------------- the report
class Report:
    """Accumulates sections and renders one self-contained HTML page."""

    def __init__(self, title: str, subtitle: str = ""):
        self.title = str(title)
        self.subtitle = str(subtitle or "")
        self._blocks: list[str] = []
        self._toc: list[tuple[str, str]] = []
        self._slugs: set[str] = set()
        self._nfig = 0

    # ---- text
    def heading(self, text: str, level: int = 2) -> None:
        level = min(6, max(1, int(level)))
        base = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")[:48] or "section"
        slug, k = base, 2
        while slug in self._slugs:
            slug, k = f"{base}-{k}", k + 1
        self._slugs.add(slug)
        if level == 2:
            self._toc.append((slug, str(text)))
        self._blocks.append(f'<h{level} id="{_e(slug)}">{_e(text)}</h{level}>')

    def paragraph(self, text: str) -> None:
        self._blocks.append(f"<p>{_e(text)}</p>")

    def key_values(self, items: Mapping[str, Any]) -> None:
        rows = []
        for k, v in dict(items).items():
            fmt = "{:.6g}" if isinstance(v, (float, np.floating)) else "{:.4f}"
            rows.append(f"<tr><th scope=\"row\">{_e(k)}</th><td>{_e(_fmt_value(v, fmt))}</td></tr>")
        if not rows:
            return
        self._blocks.append('<div class="table-wrap"><table class="kv"><tbody>' + "".join(rows)
                            + "</tbody></table></div>")

    def table(self, rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None,
              caption: str = "", number_format: str = "{:.4f}",
              highlight_best: Optional[Mapping[str, str]] = None) -> None:
        rows = [dict(r) for r in (rows or [])]
        if columns is None:
            seen: dict[str, None] = {}
            for r in rows:
                for k in r:
                    seen.setdefault(k, None)
            columns = list(seen)
        columns = list(columns)
        cap = f"<caption>{_e(caption)}</caption>" if caption else ""
        if not rows or not columns:
            self._blocks.append(f'<div class="table-wrap"><table>{cap}<tbody><tr><td>'
                                f'<em>no rows</em></td></tr></tbody></table></div>')
            return
        numeric = {c: all(_is_num(r.get(c)) or r.get(c) is None for r in rows)
                   and any(_is_num(r.get(c)) for r in rows) for c in columns}
        best: dict[str, float] = {}
        for c, how in (highlight_best or {}).items():
            vals = [float(r[c]) for r in rows if _is_num(r.get(c)) and math.isfinite(float(r[c]))]
            if vals and str(how).lower() in ("max", "min"):
                best[c] = max(vals) if str(how).lower() == "max" else min(vals)
        num_attr = ' class="num"'
        head = "".join(f'<th scope="col"{num_attr if numeric[c] else ""}>{_e(c)}</th>' for c in columns)
        body = []
        for r in rows:
            cells = []
            for c in columns:
                v = r.get(c)
                cls = ["num"] if _is_num(v) or (numeric[c] and v is None) else []
                if c in best and _is_num(v) and float(v) == best[c]:
                    cls.append("best")
                attr = f' class="{" ".join(cls)}"' if cls else ""
                cells.append(f"<td{attr}>{_e(_fmt_value(v, number_format))}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        self._blocks.append(f'<div class="table-wrap"><table>{cap}<thead><tr>{head}</tr></thead>'
                            f'<tbody>{"".join(body)}</tbody></table></div>')

    # ---- figures
    def _fig_id(self) -> str:
        self._nfig += 1
        return f"fig_{self._nfig}"  # "_" never occurs in heading slugs, so ids stay unique

    def _add_figure(self, fig: _Fig, notes: Iterable[str] = ()) -> None:
        notes = [n for n in notes if n]
        cap = f"<figcaption>{_e(' · '.join(notes))}</figcaption>" if notes else ""
        self._blocks.append(f'<figure id="{fig.fid}">{fig.svg()}{cap}</figure>')

    def histogram(self, groups: Mapping[str, Any], bins: int = 40, title: str = "", xlabel: str = "",
                  density: bool = True) -> None:
        """Overlaid semi-transparent histograms over shared bins, one colour per group."""
        if not isinstance(groups, Mapping):
            groups = {"values": groups}
        edges, counts, heights, dropped = _histogram_counts(groups, bins, density)
        names = list(counts)
        legend = [(f"{n} (n={int(counts[n].sum())})", PALETTE[i % len(PALETTE)], "rect")
                  for i, n in enumerate(names)] if len(names) > 1 else []
        fig = _Fig(self._fig_id(), title, legend=legend)
        notes = [f"{dropped} non-finite value{'s' if dropped != 1 else ''} omitted" if dropped else ""]
        if edges.size == 0:
            fig.no_data()
            self._add_figure(fig, notes)
            return
        ymax = max((float(h.max()) for h in heights.values() if h.size), default=0.0)
        y_lo, y_hi, yticks, ystep = _nice_bounds(0.0, ymax if ymax > 0 else 1.0)
        ya = _Axis(0.0, y_hi, fig.y1, fig.y0)
        xa = _Axis(float(edges[0]), float(edges[-1]), fig.x0, fig.x1)
        xticks, xstep = _nice_ticks(float(edges[0]), float(edges[-1]))
        fig.axes(xa, xticks, _tick_formatter(xticks, xstep), ya, yticks, _tick_formatter(yticks, ystep),
                 xlabel, "density" if density else "count")
        px = xa(edges)
        base = float(ya(0.0))
        for i, n in enumerate(names):
            col = PALETTE[i % len(PALETTE)]
            h, c = heights[n], counts[n]
            py = ya(h)
            g = [f'<g class="hist" data-group="{_e(n)}">']
            for b in range(len(h)):
                if c[b] == 0:
                    continue
                g.append(f'<rect x="{_f(px[b])}" y="{_f(py[b])}" width="{_f(px[b + 1] - px[b])}" '
                         f'height="{_f(base - py[b])}" fill="{col}" fill-opacity="0.4" data-count="{int(c[b])}">'
                         f'<title>{_e(n)}: [{edges[b]:.4g}, {edges[b + 1]:.4g}) n={int(c[b])}</title></rect>')
            nz = np.flatnonzero(c)
            if nz.size:  # step outline from the first to the last non-empty bin
                d = [f"M{_f(px[nz[0]])},{_f(base)}"]
                for b in range(nz[0], nz[-1] + 1):
                    d.append(f"V{_f(py[b])}H{_f(px[b + 1])}")
                d.append(f"V{_f(base)}")
                g.append(f'<path d="{"".join(d)}" fill="none" stroke="{col}" stroke-width="1.5" '
                         f'stroke-linejoin="miter"/>')
            g.append("</g>")
            fig.add("".join(g))
        if len(names) == 1:
            notes.insert(0, f"n={int(counts[names[0]].sum())}")
        self._add_figure(fig, notes)

    def line_plot(self, series: Mapping[str, tuple[Any, Any]], title: str = "", xlabel: str = "",
                  ylabel: str = "", logx: bool = False, markers: bool = True) -> None:
        """One line per series (x sorted as given); non-finite points break the line."""
        cleaned: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        dropped = 0
        for name, xy in (series or {}).items():
            try:
                x, y = xy
            except (TypeError, ValueError):
                x, y = np.arange(len(_as_float(xy))), xy
            x, y = _as_float(x), _as_float(y)
            n = min(x.size, y.size)
            x, y = x[:n], y[:n]
            ok = np.isfinite(x) & np.isfinite(y)
            if logx:
                ok &= x > 0
            dropped += int(n - ok.sum())
            cleaned[name] = (np.where(ok, x, np.nan), np.where(ok, y, np.nan))
        styles = [(PALETTE[i % len(PALETTE)], _DASHES[(i // len(PALETTE)) % len(_DASHES)])
                  for i in range(len(cleaned))]
        legend = [(n, styles[i][0], "line:" + styles[i][1] if styles[i][1] else "line")
                  for i, n in enumerate(cleaned)]
        fig = _Fig(self._fig_id(), title, legend=legend)
        notes = [f"{dropped} non-finite point{'s' if dropped != 1 else ''} omitted" if dropped else ""]
        allx = np.concatenate([v[0] for v in cleaned.values()]) if cleaned else np.array([])
        ally = np.concatenate([v[1] for v in cleaned.values()]) if cleaned else np.array([])
        allx, ally = allx[np.isfinite(allx)], ally[np.isfinite(ally)]
        if allx.size == 0:
            fig.no_data()
            self._add_figure(fig, notes)
            return
        xa, xticks, xfmt = _axis_from_data(allx, logx, fig.x0, fig.x1, pad=0.0, nice=False)
        ya, yticks, yfmt = _axis_from_data(ally, False, fig.y1, fig.y0, pad=0.0, nice=True)
        fig.axes(xa, xticks, xfmt, ya, yticks, yfmt, xlabel, ylabel)
        cid = fig.clip(pad=4)
        for i, (name, (x, y)) in enumerate(cleaned.items()):
            col, dash = styles[i]
            px, py = xa(x), ya(y)
            ok = np.isfinite(px) & np.isfinite(py)
            d, pen = [], False
            for j in range(px.size):
                if ok[j]:
                    d.append(f"{'L' if pen else 'M'}{_f(px[j])},{_f(py[j])}")
                    pen = True
                else:
                    pen = False
            da = f' stroke-dasharray="{dash}"' if dash else ""
            g = [f'<g class="series" data-series="{_e(name)}" clip-path="url(#{cid})">']
            if d:
                g.append(f'<path d="{"".join(d)}" fill="none" stroke="{col}" stroke-width="2" '
                         f'stroke-linejoin="round" stroke-linecap="round"{da}/>')
            if markers and ok.sum() <= 80:
                for j in np.flatnonzero(ok):
                    g.append(f'<circle cx="{_f(px[j])}" cy="{_f(py[j])}" r="3" fill="{col}" '
                             f'stroke="#ffffff" stroke-width="0.8"/>')
            g.append("</g>")
            fig.add("".join(g))
        self._add_figure(fig, notes)

    def scatter(self, x: Any, y: Any, title: str = "", xlabel: str = "", ylabel: str = "",
                groups: Optional[Any] = None, logx: bool = False, max_points: int = 5000) -> None:
        """Scatter plot; above ``max_points`` a fixed-seed random subsample is drawn."""
        x, y = _as_float(x), _as_float(y)
        n = min(x.size, y.size)
        x, y = x[:n], y[:n]
        g_arr = np.asarray(groups).ravel()[:n] if groups is not None else None
        if g_arr is not None and g_arr.size < n:
            g_arr = None
        ok = np.isfinite(x) & np.isfinite(y)
        if logx:
            ok &= x > 0
        notes = [f"{int(n - ok.sum())} non-finite{' or non-positive-x' if logx else ''} point"
                 f"{'s' if n - ok.sum() != 1 else ''} omitted" if n - ok.sum() else ""]
        idx = np.flatnonzero(ok)
        total = idx.size
        max_points = max(1, int(max_points))
        if total > max_points:
            idx = np.sort(np.random.default_rng(0).choice(idx, size=max_points, replace=False))
            notes.insert(0, f"showing a random {max_points:,} of {total:,} points")
        else:
            notes.insert(0, f"n={total:,}")
        labels: list[str] = []
        gidx = np.zeros(idx.size, dtype=int)
        if g_arr is not None:
            uniq, inv = np.unique(g_arr[ok].astype(str) if g_arr.dtype.kind not in "biuf" else g_arr[ok],
                                  return_inverse=True)
            labels = [str(u) for u in uniq]
            full = np.zeros(n, dtype=int)
            full[ok] = inv.ravel()
            gidx = full[idx]
        legend = [(lab, PALETTE[i % len(PALETTE)], "dot") for i, lab in enumerate(labels)]
        fig = _Fig(self._fig_id(), title, legend=legend)
        if idx.size == 0:
            fig.no_data()
            self._add_figure(fig, notes)
            return
        xs, ys = x[idx], y[idx]
        xa, xticks, xfmt = _axis_from_data(xs, logx, fig.x0, fig.x1, pad=0.03, nice=False)
        ya, yticks, yfmt = _axis_from_data(ys, False, fig.y1, fig.y0, pad=0.0, nice=True)
        fig.axes(xa, xticks, xfmt, ya, yticks, yfmt, xlabel, ylabel)
        px, py = xa(xs), ya(ys)
        r = 2.6 if idx.size > 1000 else 3.2
        op = 0.45 if idx.size > 1000 else 0.7
        order = range(max(1, len(labels)))
        for gi in order:
            sel = np.flatnonzero(gidx == gi)
            if sel.size == 0:
                continue
            col = PALETTE[gi % len(PALETTE)]
            g = [f'<g class="points" fill="{col}" fill-opacity="{op}">']
            g.extend(f'<circle cx="{_f(px[j])}" cy="{_f(py[j])}" r="{r}"/>' for j in sel)
            g.append("</g>")
            fig.add("".join(g))
        self._add_figure(fig, notes)

    def heatmap(self, matrix: Any, row_labels: Sequence[Any], col_labels: Sequence[Any], title: str = "",
                xlabel: str = "", ylabel: str = "", value_format: str = "{:.3f}") -> None:
        """Cells coloured on a viridis scale (with a colour bar) and annotated when they fit."""
        m = np.asarray(matrix, dtype=float)
        if m.ndim == 1:
            m = m[None, :]
        if m.ndim != 2:
            m = m.reshape(m.shape[0], -1) if m.size else np.zeros((0, 0))
        R, C = m.shape
        rl = [_truncate(str(v), 24) for v in list(row_labels or [])[:R]] + [""] * max(0, R - len(row_labels or []))
        cl = [_truncate(str(v), 18) for v in list(col_labels or [])[:C]] + [""] * max(0, C - len(col_labels or []))
        row_w = max((_text_w(s) for s in rl), default=0)
        left = 14 + (20 if ylabel else 0) + min(170.0, row_w + 10)
        right = 84
        pw = 640 - left - right
        cell_w = pw / max(1, C)
        col_w = max((_text_w(s) for s in cl), default=0)
        rotate = col_w + 6 > cell_w
        bottom = (14 + (24 if xlabel else 0) + (col_w * 0.72 + 12 if rotate else 16))
        cell_h = max(4.0, min(40.0, 280.0 / max(1, R)))
        top_extra = 24 if title else 0
        height = 14 + top_extra + R * cell_h + bottom
        fig = _Fig(self._fig_id(), title, width=640, height=max(120.0, height), left=left, right=right,
                   bottom=bottom)
        if m.size == 0:
            fig.no_data()
            self._add_figure(fig)
            return
        fig.y1 = fig.y0 + R * cell_h
        finite = m[np.isfinite(m)]
        if finite.size:
            vmin, vmax = float(finite.min()), float(finite.max())
        else:
            vmin, vmax = 0.0, 1.0
        span = vmax - vmin
        with np.errstate(invalid="ignore"):
            t = (np.clip(m, vmin, vmax) - vmin) / span if span > 0 else np.full(m.shape, 0.5)
        g = ['<g class="cells">']
        fs = 11 if cell_h >= 18 else 9.5
        for i in range(R):
            for j in range(C):
                v = m[i, j]
                x, y = fig.x0 + j * cell_w, fig.y0 + i * cell_h
                if np.isnan(v):
                    colour, txt = "#e1e4e8", "n/a"
                else:
                    colour = _viridis(t[i, j])[0]
                    txt = _fmt_value(float(v), value_format)
                g.append(f'<rect x="{_f(x)}" y="{_f(y)}" width="{_f(cell_w)}" height="{_f(cell_h)}" '
                         f'fill="{colour}" stroke="#ffffff" stroke-width="0.6"><title>{_e(rl[i])} / {_e(cl[j])}: '
                         f'{_e(txt)}</title></rect>')
                if cell_h >= 13 and _text_w(txt, fs) + 6 <= cell_w:
                    tc = "#1f2328" if _luminance(colour) > 0.45 else "#ffffff"
                    g.append(f'<text x="{_f(x + cell_w / 2)}" y="{_f(y + cell_h / 2 + fs * 0.36)}" '
                             f'text-anchor="middle" font-size="{fs}" fill="{tc}">{_e(txt)}</text>')
        g.append("</g>")
        # row / column labels, thinned when crowded
        rs = max(1, math.ceil(12 / cell_h))
        for i in range(0, R, rs):
            cy = fig.y0 + (i + 0.5) * cell_h
            g.append(f'<text x="{_f(fig.x0 - 6)}" y="{_f(cy + 3.8)}" text-anchor="end" fill="#424a53">'
                     f'{_e(rl[i])}</text>')
        cs = max(1, math.ceil(13 / cell_w)) if rotate else 1
        for j in range(0, C, cs):
            cx = fig.x0 + (j + 0.5) * cell_w
            if rotate:
                ty = fig.y1 + 10
                g.append(f'<text x="{_f(cx)}" y="{_f(ty)}" text-anchor="end" fill="#424a53" '
                         f'transform="rotate(-45 {_f(cx)} {_f(ty)})">{_e(cl[j])}</text>')
            else:
                g.append(f'<text x="{_f(cx)}" y="{_f(fig.y1 + 15)}" text-anchor="middle" fill="#424a53">'
                         f'{_e(cl[j])}</text>')
        if xlabel:
            g.append(f'<text x="{_f((fig.x0 + fig.x1) / 2)}" y="{_f(fig.y1 + bottom - 12)}" '
                     f'text-anchor="middle" font-size="12" fill="#1f2328">{_e(_truncate(xlabel, 80))}</text>')
        if ylabel:
            cy = (fig.y0 + fig.y1) / 2
            g.append(f'<text x="14" y="{_f(cy)}" transform="rotate(-90 14 {_f(cy)})" text-anchor="middle" '
                     f'font-size="12" fill="#1f2328">{_e(_truncate(ylabel, 50))}</text>')
        # colour bar
        bx, bw = fig.x1 + 16, 12
        by0, by1 = fig.y0, max(fig.y1, fig.y0 + 80)
        gid = f"{fig.fid}-grad"
        stops = "".join(f'<stop offset="{_f(k / (len(_VIRIDIS) - 1))}" stop-color="{c}"/>'
                        for k, c in enumerate(_viridis(np.linspace(0, 1, len(_VIRIDIS)))))
        g.append(f'<defs><linearGradient id="{gid}" x1="0" y1="1" x2="0" y2="0">{stops}</linearGradient></defs>')
        g.append(f'<rect x="{_f(bx)}" y="{_f(by0)}" width="{bw}" height="{_f(by1 - by0)}" fill="url(#{gid})" '
                 f'stroke="#d0d7de"/>')
        if span > 0:
            ticks, step = _nice_ticks(vmin, vmax, target=5)
            fmt = _tick_formatter(ticks, step)
            ba = _Axis(vmin, vmax, by1, by0)
            for tv in ticks:
                ty = float(ba(tv))
                g.append(f'<line x1="{_f(bx + bw)}" y1="{_f(ty)}" x2="{_f(bx + bw + 3)}" y2="{_f(ty)}" '
                         f'stroke="#57606a"/><text x="{_f(bx + bw + 6)}" y="{_f(ty + 3.8)}" fill="#424a53">'
                         f'{_e(fmt(tv))}</text>')
        elif finite.size:
            g.append(f'<text x="{_f(bx + bw + 6)}" y="{_f((by0 + by1) / 2 + 3.8)}" fill="#424a53">'
                     f'{_e(_fmt_value(vmin, value_format))}</text>')
        fig.add("".join(g))
        nn = int(np.isnan(m).sum())
        self._add_figure(fig, [f"{nn} missing cell{'s' if nn != 1 else ''}" if nn else ""])

    def bar_chart(self, labels: Sequence[Any], values: Any, title: str = "", xlabel: str = "",
                  errors: Optional[Any] = None, horizontal: bool = True) -> None:
        """Bars from zero (negative values in a second colour), optional symmetric error bars."""
        vals = _as_float(values)
        labs = [str(s) for s in list(labels or [])[:vals.size]]
        labs += [""] * (vals.size - len(labs))
        errs = _as_float(errors) if errors is not None else np.zeros(vals.size)
        if errs.size != vals.size:
            errs = np.zeros(vals.size)
        errs = np.where(np.isfinite(errs), np.abs(errs), 0.0)
        n = vals.size
        ok = np.isfinite(vals)
        lo_v = np.minimum(0.0, (vals - errs)[ok]) if ok.any() else np.array([0.0])
        hi_v = np.maximum(0.0, (vals + errs)[ok]) if ok.any() else np.array([1.0])
        short = [_truncate(s, 32) for s in labs]
        if horizontal:
            left = 14 + min(200.0, max((_text_w(s) for s in short), default=0) + 10)
            slot = 22.0 if n <= 30 else max(8.0, 660.0 / n)
            height = 14 + (24 if title else 0) + max(1, n) * slot + 50
            fig = _Fig(self._fig_id(), title, height=max(140.0, height), left=left, right=60)
        else:
            lw = max((_text_w(s) for s in short), default=0)
            bottom = 50 + (lw * 0.72 if n > 6 or lw > 560 / max(1, n) else 0)
            fig = _Fig(self._fig_id(), title, bottom=bottom, height=360 + max(0, bottom - 50))
        if n == 0:
            fig.no_data()
            self._add_figure(fig)
            return
        lo, hi, ticks, step = _nice_bounds(float(lo_v.min()), float(hi_v.max()))
        fmt = _tick_formatter(ticks, step)
        g = ['<g class="bars">']
        if horizontal:
            fig.y1 = fig.y0 + n * slot
            vtxt = [_fmt_compact(float(v)) if np.isfinite(v) else "" for v in vals]
            # widen the value axis until the value labels of the bars fit inside the plot area
            for _ in range(6):
                va = _Axis(lo, hi, fig.x0, fig.x1)
                need_lo = need_hi = False
                for i in np.flatnonzero(ok):
                    v, w = float(vals[i]), _text_w(vtxt[i], 10.5) + 6
                    if v < 0 and float(va(v - errs[i])) - w < fig.x0:
                        need_lo = True
                    if v >= 0 and float(va(v + errs[i])) + w > fig.x1 + 40:
                        need_hi = True
                if not (need_lo or need_hi) or slot < 14:
                    break
                lo, hi = (lo - step if need_lo else lo), (hi + step if need_hi else hi)
                ticks = [t for t in ([lo] if need_lo else []) + ticks + ([hi] if need_hi else [])]
            va = _Axis(lo, hi, fig.x0, fig.x1)
            fig.axes(va, ticks, fmt, None, [], fmt, xlabel, "")
            z = float(va(0.0))
            bh = slot * 0.68
            for i in range(n):
                cy = fig.y0 + (i + 0.5) * slot
                if slot >= 11 or i % math.ceil(11 / slot) == 0:
                    g.append(f'<text x="{_f(fig.x0 - 6)}" y="{_f(cy + 3.8)}" text-anchor="end" fill="#424a53">'
                             f'<title>{_e(labs[i])}</title>{_e(short[i])}</text>')
                if not ok[i]:
                    g.append(f'<text x="{_f(z + 4)}" y="{_f(cy + 3.8)}" fill="#6e7781">n/a</text>')
                    continue
                v = float(vals[i])
                pv = float(va(v))
                col = PALETTE[0] if v >= 0 else PALETTE[3]
                g.append(f'<rect x="{_f(min(z, pv))}" y="{_f(cy - bh / 2)}" width="{_f(abs(pv - z))}" '
                         f'height="{_f(bh)}" fill="{col}" fill-opacity="0.85"><title>{_e(labs[i])}: {v:.6g}'
                         f'</title></rect>')
                if errs[i] > 0:
                    e0, e1 = float(va(v - errs[i])), float(va(v + errs[i]))
                    g.append(f'<path d="M{_f(e0)},{_f(cy)}H{_f(e1)}M{_f(e0)},{_f(cy - 4)}V{_f(cy + 4)}'
                             f'M{_f(e1)},{_f(cy - 4)}V{_f(cy + 4)}" stroke="#1f2328" stroke-width="1.1" fill="none"/>')
                if slot >= 14:
                    end = max(pv, float(va(v + errs[i]))) if v >= 0 else min(pv, float(va(v - errs[i])))
                    anchor, dx = ("start", 4) if v >= 0 else ("end", -4)
                    g.append(f'<text x="{_f(end + dx)}" y="{_f(cy + 3.8)}" text-anchor="{anchor}" '
                             f'font-size="10.5" fill="#424a53">{_e(vtxt[i])}</text>')
            g.append(f'<line x1="{_f(z)}" y1="{_f(fig.y0)}" x2="{_f(z)}" y2="{_f(fig.y1)}" stroke="#57606a"/>')
        else:
            va = _Axis(lo, hi, fig.y1, fig.y0)
            fig.axes(None, [], fmt, va, ticks, fmt, "", xlabel)
            z = float(va(0.0))
            slot = (fig.x1 - fig.x0) / n
            bw = min(slot * 0.7, 64.0)
            rotate = fig.h - 360 > 0
            for i in range(n):
                cx = fig.x0 + (i + 0.5) * slot
                if rotate:
                    ty = fig.y1 + 10
                    g.append(f'<text x="{_f(cx)}" y="{_f(ty)}" text-anchor="end" fill="#424a53" '
                             f'transform="rotate(-45 {_f(cx)} {_f(ty)})">{_e(short[i])}</text>')
                else:
                    g.append(f'<text x="{_f(cx)}" y="{_f(fig.y1 + 16)}" text-anchor="middle" fill="#424a53">'
                             f'{_e(short[i])}</text>')
                if not ok[i]:
                    continue
                v = float(vals[i])
                pv = float(va(v))
                col = PALETTE[0] if v >= 0 else PALETTE[3]
                g.append(f'<rect x="{_f(cx - bw / 2)}" y="{_f(min(z, pv))}" width="{_f(bw)}" '
                         f'height="{_f(abs(pv - z))}" fill="{col}" fill-opacity="0.85"><title>{_e(labs[i])}: '
                         f'{v:.6g}</title></rect>')
                if errs[i] > 0:
                    e0, e1 = float(va(v - errs[i])), float(va(v + errs[i]))
                    g.append(f'<path d="M{_f(cx)},{_f(e0)}V{_f(e1)}M{_f(cx - 4)},{_f(e0)}H{_f(cx + 4)}'
                             f'M{_f(cx - 4)},{_f(e1)}H{_f(cx + 4)}" stroke="#1f2328" stroke-width="1.1" fill="none"/>')
            g.append(f'<line x1="{_f(fig.x0)}" y1="{_f(z)}" x2="{_f(fig.x1)}" y2="{_f(z)}" stroke="#57606a"/>')
        g.append("</g>")
        fig.add("".join(g))
        nn = int((~ok).sum())
        self._add_figure(fig, [f"{nn} non-finite value{'s' if nn != 1 else ''}" if nn else ""])

    # ---- output
    def html(self) -> str:
        toc = ""
        if len(self._toc) >= 3:
            toc = ('<nav class="toc"><strong>Contents</strong><ol>'
                   + "".join(f'<li><a href="#{_e(s)}">{_e(t)}</a></li>' for s, t in self._toc)
                   + "</ol></nav>")
        sub = f'<p class="subtitle">{_e(self.subtitle)}</p>' if self.subtitle else ""
        return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
                f"<title>{_e(self.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
                f"<main class=\"container\">\n<header><h1>{_e(self.title)}</h1>{sub}</header>\n{toc}\n"
                + "\n".join(self._blocks)
                + "\n<footer>Generated by recval_ray. Self-contained report: inline SVG and CSS, "
                  "no scripts.</footer>\n</main>\n</body>\n</html>\n")

    def write(self, target: Any, endpoint_url: Optional[str] = None) -> str:
        """Write the page; ``target`` is a local path, a URI (``s3://...``), a ``(filesystem, path)``
        pair or a callable taking the UTF-8 bytes. Returns the HTML text."""
        text = self.html()
        data = text.encode("utf-8")
        if callable(target):
            target(data)
        elif isinstance(target, tuple) and len(target) == 2:
            from recval_ray import fs as _fs
            _fs.write_bytes(target[0], target[1], data)
        else:
            uri = os.fspath(target)
            if "://" in uri and not uri.startswith("file://"):
                from recval_ray import fs as _fs
                fsys, path = _fs.resolve(uri, endpoint_url)
                _fs.write_bytes(fsys, path, data)
            else:
                path = uri[len("file://"):] if uri.startswith("file://") else uri
                parent = os.path.dirname(os.path.abspath(path))
                os.makedirs(parent, exist_ok=True)
                with open(path, "wb") as fh:
                    fh.write(data)
        return text


def _demo_report() -> Report:
    """A report exercising every element (used by the tests and ``python -m recval_ray.report``)."""
    rng = np.random.default_rng(7)
    n = 4000
    noise = rng.random(n) < 0.1
    v = rng.normal(0.0, 1.0, n) - 2.2 * noise
    n_ratings = np.rint(np.exp(rng.normal(3.0, 1.2, n))).astype(int) + 1
    rep = Report("Training-data valuation <demo>", subtitle="run demo-0001 · MovieLens-like synthetic data")
    rep.key_values({"run id": "demo-0001", "dataset": "s3://bucket/data/ratings.parquet", "rows": n,
                    "model": "MF (dim=32)", "valuation time (s)": 123.456789, "seed": 7, "notes": None})
    rep.heading("Value distribution")
    rep.paragraph("Values of clean rows versus rows with injected label noise. Rows with injected noise "
                  "should get lower values; the more separated the histograms, the better.")
    rep.histogram({"clean": v[~noise], "injected noise": v[noise]}, title="Data value by origin",
                  xlabel="value")
    rep.heading("Noise detection")
    fpr, tpr, auc = roc_curve(-v, noise)
    fpr2, tpr2, auc2 = roc_curve(-v + rng.normal(0, 2, n), noise)
    rep.line_plot({f"influence (AUC {auc:.3f})": (fpr, tpr), f"loss (AUC {auc2:.3f})": (fpr2, tpr2),
                   "chance": (np.array([0.0, 1.0]), np.array([0.0, 1.0]))},
                  title="ROC: detecting injected noise", xlabel="false positive rate",
                  ylabel="true positive rate", markers=False)
    rep.table([{"method": "influence", "auc": auc, "precision@10%": 0.61, "time_s": 12.5, "rows": n},
               {"method": "loss", "auc": auc2, "precision@10%": 0.44, "time_s": 3.1, "rows": n},
               {"method": "random", "auc": 0.5, "precision@10%": 0.1, "time_s": None, "rows": n}],
              caption="Noise detection by method", highlight_best={"auc": "max", "time_s": "min"})
    rep.heading("Pruning sweep")
    fr = np.array([0.0, 0.05, 0.1, 0.2, 0.3, 0.5])
    rep.line_plot({"prune lowest value": (fr, 0.91 - 0.04 * fr + 0.03 * np.sqrt(fr)),
                   "prune random": (fr, 0.91 - 0.12 * fr)},
                  title="Test RMSE after pruning", xlabel="fraction pruned", ylabel="RMSE")
    lrs, dims = [1e-3, 3e-3, 1e-2, 3e-2], [8, 16, 32, 64, 128]
    hm = np.array([[0.95 - 0.01 * j + 0.02 * abs(i - 2) for j in range(5)] for i in range(4)])
    hm[0, 4] = np.nan
    rep.heatmap(hm, [f"lr={x:g}" for x in lrs], [f"dim={d}" for d in dims], title="Validation RMSE sweep",
                xlabel="embedding dim", ylabel="learning rate")
    rep.heading("Influence vs activity")
    rep.scatter(n_ratings, v, title="Value vs number of ratings of the user", xlabel="ratings per user",
                ylabel="value", groups=np.where(noise, "injected noise", "clean"), logx=True, max_points=2000)
    rep.heading("Feature importance")
    feats = ["user_n_ratings", "item_popularity", "rating", "timestamp_age_days", "genre_drama",
             "user_mean_rating"]
    imp = np.array([0.31, 0.22, -0.08, 0.12, 0.04, 0.18])
    rep.bar_chart(feats, imp, title="Global feature importance", xlabel="mean |SHAP|",
                  errors=np.array([0.03, 0.02, 0.01, 0.02, 0.01, 0.03]))
    rep.bar_chart(["a", "b", "c"], np.array([3, 5, 2]), title="Vertical bars", xlabel="count",
                  horizontal=False)
    rep.heading("Degenerate inputs", level=3)
    rep.histogram({"empty": np.array([])}, title="Empty histogram")
    rep.histogram({"constant": np.full(10, 2.0), "nan": np.array([np.nan, np.inf])},
                  title="Constant values", bins=10)
    return rep


def value_distributions(rep, values: dict) -> None:
    """Per method (``label -> valued table``): the value histogram by ``is_noise`` and one ROC
    curve of ``-value`` for ``is_noise`` per method in a shared plot."""
    curves = {}
    for label, tab in values.items():
        v = tab.column("value").to_numpy(zero_copy_only=False)
        if "is_noise" in tab.column_names:
            noise = tab.column("is_noise").to_numpy(zero_copy_only=False).astype(bool)
            rep.histogram({"clean": v[~noise], "injected noise": v[noise]}, title=f"{label} values by is_noise",
                          xlabel="value (higher = more useful)")
            ok = ~np.isnan(v)
            if noise[ok].any() and (~noise[ok]).any():
                fpr, tpr, auc = roc_curve(-v[ok], noise[ok])
                curves[f"{label} (AUC {auc:.3f})"] = (fpr, tpr)
        else:
            rep.histogram({"all": v}, title=f"{label} values", xlabel="value (higher = more useful)")
    if curves:
        curves["chance"] = (np.array([0.0, 1.0]), np.array([0.0, 1.0]))
        rep.line_plot(curves, title="noise detection ROC (score = -value)", xlabel="false positive rate",
                      ylabel="true positive rate", markers=False)


def fmt_value(v: Any) -> str:
    """A short, stable text of a swept value (names, tables, labels)."""
    if isinstance(v, bool) or v is None:
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, separators=(",", ":"), default=str)
    return str(v)


if __name__ == "__main__":  # pragma: no cover
    import sys
    out = sys.argv[1] if len(sys.argv) > 1 else "report_example.html"
    _demo_report().write(out)
    print(out)
