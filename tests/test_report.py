"""Tests for the dependency-free HTML report builder (``recval_ray.report``)."""
from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pytest

from recval_ray.report import (
    PALETTE,
    Report,
    _demo_report,
    _fmt_value,
    _histogram_counts,
    _log_ticks,
    _nice_bounds,
    _nice_ticks,
    roc_curve,
)

SVG_NS = "{http://www.w3.org/2000/svg}"
VOID = {"meta", "br", "hr", "img", "input", "link", "area", "base", "col", "embed", "source", "track", "wbr"}
# SVG elements that the renderer writes self-closed (<rect .../>)
SELF_CLOSING_OK = {"rect", "line", "path", "circle", "stop"}


class _TagBalance(HTMLParser):
    """Checks that every non-void tag is closed in order."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        if tag not in VOID and tag not in SELF_CLOSING_OK:
            self.errors.append(f"unexpected self-closed <{tag}/>")

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _check_well_formed(page: str) -> list[ET.Element]:
    assert page.startswith("<!DOCTYPE html>")
    p = _TagBalance()
    p.feed(page)
    p.close()
    assert not p.errors, p.errors[:5]
    assert not p.stack, p.stack
    svgs = re.findall(r"<svg\b.*?</svg>", page, flags=re.S)
    roots = [ET.fromstring(s) for s in svgs]  # each figure must be valid XML on its own
    for r in roots:
        assert r.tag == SVG_NS + "svg"
    # document-wide unique ids (clip paths, gradients, figures)
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))
    # nothing fetched from the network
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page and "<script" not in page.lower()
    return roots


def _rects(root: ET.Element, group_attr: str | None = None) -> list[ET.Element]:
    out = []
    for g in root.iter(SVG_NS + "g"):
        if group_attr is None or g.get("data-group") == group_attr:
            out.extend(g.findall(SVG_NS + "rect"))
    return out


# --------------------------------------------------------------------------- whole report
def test_demo_report_is_well_formed_and_has_every_element():
    page = _demo_report().html()
    roots = _check_well_formed(page)
    assert len(roots) == 9
    for marker in ("<table", 'class="kv"', "<h2", "<h3", "<p>", "<figcaption", 'class="hist"',
                   'class="series"', 'class="points"', 'class="cells"', 'class="bars"', "no data"):
        assert marker in page, marker


def test_output_is_deterministic():
    a, b = _demo_report().html(), _demo_report().html()
    assert a.encode() == b.encode()


def test_all_user_strings_are_escaped():
    evil = "<script>alert('x')</script>&\""
    rep = Report(evil, subtitle=evil)
    rep.heading(evil)
    rep.heading(evil, level=3)
    rep.paragraph(evil)
    rep.key_values({evil: evil})
    rep.table([{evil: evil, "x": 1.0}], caption=evil, highlight_best={"x": "max"})
    rep.histogram({evil: np.arange(10.0), "b": np.arange(5.0)}, title=evil, xlabel=evil)
    rep.line_plot({evil: (np.arange(3), np.arange(3))}, title=evil, xlabel=evil, ylabel=evil)
    rep.scatter(np.arange(5), np.arange(5), groups=np.array([evil] * 5), title=evil, xlabel=evil, ylabel=evil)
    rep.heatmap(np.eye(2), [evil, "b"], [evil, "d"], title=evil, xlabel=evil, ylabel=evil)
    rep.bar_chart([evil, "b"], np.array([1.0, 2.0]), title=evil, xlabel=evil)
    rep.bar_chart([evil, "b"], np.array([1.0, 2.0]), title=evil, xlabel=evil, horizontal=False)
    page = rep.html()
    assert "<script" not in page.lower()
    assert "&lt;script&gt;" in page
    _check_well_formed(page)
    # the parsed title round-trips to the original text
    m = re.search(r"<title>(.*?)</title>", page)
    import html as _h
    assert _h.unescape(m.group(1)) == evil


# --------------------------------------------------------------------------- histogram
def test_histogram_counts_known_input():
    edges, counts, heights, dropped = _histogram_counts(
        {"a": [0, 0, 1, 2, 2, 2, 3, np.nan], "b": [3, 3, np.inf]}, bins=3, density=False)
    np.testing.assert_allclose(edges, [0, 1, 2, 3])
    assert counts["a"].tolist() == [2, 1, 4]        # last bin includes the right edge
    assert counts["b"].tolist() == [0, 0, 2]
    assert dropped == 2
    np.testing.assert_allclose(heights["a"], [2, 1, 4])
    _, _, dens, _ = _histogram_counts({"a": [0, 0, 1, 2, 2, 2, 3]}, bins=3, density=True)
    np.testing.assert_allclose(dens["a"], np.array([2, 1, 4]) / 7.0)
    np.testing.assert_allclose((dens["a"] * np.diff(edges)).sum(), 1.0)


def test_histogram_counts_match_numpy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=500), rng.normal(2, 1, size=300)
    edges, counts, _, _ = _histogram_counts({"a": a, "b": b}, bins=17, density=False)
    ref_edges = np.histogram_bin_edges(np.r_[a, b], bins=17)
    np.testing.assert_allclose(edges, ref_edges)
    assert counts["a"].tolist() == np.histogram(a, ref_edges)[0].tolist()
    assert counts["b"].tolist() == np.histogram(b, ref_edges)[0].tolist()


def test_histogram_bars_in_svg_reflect_counts():
    rep = Report("h")
    rep.histogram({"g": np.array([0, 0, 1, 2, 2, 2, 3], dtype=float)}, bins=3, density=False)
    (root,) = _check_well_formed(rep.html())
    rects = _rects(root, "g")
    assert [int(r.get("data-count")) for r in rects] == [2, 1, 4]
    h = np.array([float(r.get("height")) for r in rects])
    np.testing.assert_allclose(h / h[0], [1.0, 0.5, 2.0], rtol=1e-3)
    # bottoms on the same baseline
    bottoms = {round(float(r.get("y")) + float(r.get("height")), 1) for r in rects}
    assert len(bottoms) == 1


def test_histogram_empty_nan_and_constant():
    rep = Report("h")
    rep.histogram({"empty": np.array([])}, title="nothing")
    rep.histogram({"nan": np.array([np.nan, np.inf, -np.inf])})
    rep.histogram({})
    rep.histogram({"const": np.full(7, 3.25)}, bins=10)
    page = rep.html()
    roots = _check_well_formed(page)
    assert page.count("no data") == 3
    assert "3 non-finite values omitted" in page
    edges, counts, _, _ = _histogram_counts({"c": np.full(7, 3.25)}, bins=10)
    assert counts["c"].sum() == 7
    k = int(np.flatnonzero(counts["c"])[0])
    assert math.isclose((edges[k] + edges[k + 1]) / 2, 3.25)
    assert len(_rects(roots[3], "const")) == 1


# --------------------------------------------------------------------------- ROC
def _mann_whitney_auc(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def test_roc_hand_computed():
    fpr, tpr, auc = roc_curve(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    assert auc == pytest.approx(0.75)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])


def test_roc_ties_are_averaged():
    fpr, tpr, auc = roc_curve(np.array([0.5, 0.5, 0.2]), np.array([1, 0, 0]))
    np.testing.assert_allclose(fpr, [0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 1, 1])
    assert auc == pytest.approx(0.75)
    # all scores tied -> chance
    assert roc_curve(np.ones(6), np.array([0, 1, 0, 1, 1, 0]))[2] == pytest.approx(0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_matches_mann_whitney_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 400
    labels = (rng.random(n) < 0.3).astype(int)
    scores = np.round(rng.normal(size=n) + labels * 0.7, 1)  # rounding creates many ties
    assert len(np.unique(scores)) < n
    fpr, tpr, auc = roc_curve(scores, labels)
    assert auc == pytest.approx(_mann_whitney_auc(scores, labels), abs=1e-12)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # boolean labels and -1/+1 labels give the same result
    assert roc_curve(scores, labels.astype(bool))[2] == pytest.approx(auc)
    assert roc_curve(scores, 2 * labels - 1)[2] == pytest.approx(auc)


def test_roc_degenerate_inputs():
    assert math.isnan(roc_curve(np.array([]), np.array([]))[2])
    assert math.isnan(roc_curve(np.array([0.1, 0.2]), np.array([1, 1]))[2])
    assert math.isnan(roc_curve(np.array([0.1, 0.2]), np.array([0, 0]))[2])
    # NaN scores are dropped
    _, _, auc = roc_curve(np.array([0.1, np.nan, 0.35, 0.8, 0.4]), np.array([0, 1, 1, 1, 0]))
    assert auc == pytest.approx(0.75)
    with pytest.raises(ValueError):
        roc_curve(np.arange(3), np.arange(4))


# --------------------------------------------------------------------------- tables
def test_value_formatting():
    assert _fmt_value(3) == "3"
    assert _fmt_value(np.int64(12345678)) == "12345678"
    assert _fmt_value(0.123456) == "0.1235"
    assert _fmt_value(np.float32(2.5), "{:.1f}") == "2.5"
    assert _fmt_value(None) == "\u2014"
    assert _fmt_value(True) == "true"
    assert _fmt_value(float("nan")) == "NaN"
    assert _fmt_value(float("-inf")) == "\u2212\u221e"


def test_table_formats_and_highlights():
    rep = Report("t")
    rep.table([{"m": "a", "auc": 0.9, "n": 10, "t": 2.0},
               {"m": "b", "auc": 0.95, "n": 20, "t": None},
               {"m": "c", "auc": float("nan"), "n": 30, "t": 1.0, "extra": "x"}],
              caption="cap", highlight_best={"auc": "max", "t": "min"})
    page = rep.html()
    _check_well_formed(page)
    assert re.search(r'<td class="num best">0\.9500</td>', page)
    assert re.search(r'<td class="num best">1\.0000</td>', page)
    assert page.count(" best") == 2
    assert "<td class=\"num\">10</td>" in page
    assert "\u2014" in page and "NaN" in page
    assert "<th scope=\"col\">extra</th>" in page   # union of keys as columns
    rep.table([], caption="empty")
    assert "no rows" in rep.html()


def test_key_values_and_headings():
    rep = Report("k")
    rep.key_values({"run": "r1", "rows": 5, "secs": 1.23456789, "none": None, "cfg": {"a": 1}})
    for name in ("A", "B", "A"):
        rep.heading(name)
    page = rep.html()
    _check_well_formed(page)
    assert "1.23457" in page and "{&quot;a&quot;: 1}" in page
    assert 'id="a"' in page and 'id="a-2"' in page and 'class="toc"' in page


# --------------------------------------------------------------------------- other plots
def test_degenerate_plot_inputs_do_not_crash():
    rep = Report("d")
    e = np.array([])
    nan = np.array([np.nan, np.nan])
    rep.line_plot({})
    rep.line_plot({"e": (e, e)})
    rep.line_plot({"nan": (nan, nan)}, logx=True)
    rep.line_plot({"const": (np.ones(4), np.ones(4))})
    rep.line_plot({"gap": (np.arange(5.0), np.array([1, 2, np.nan, 4, 5]))})
    rep.line_plot({"neg-log": (np.array([-1.0, 0.0, 1.0, 10.0]), np.arange(4.0))}, logx=True)
    rep.scatter(e, e)
    rep.scatter(nan, nan, groups=np.array(["a", "b"]))
    rep.scatter(np.full(5, 2.0), np.full(5, 2.0), logx=True)
    rep.heatmap(np.zeros((0, 0)), [], [])
    rep.heatmap(np.full((2, 3), np.nan), ["a", "b"], ["x", "y", "z"])
    rep.heatmap(np.full((2, 2), 0.5), ["a", "b"], ["x", "y"])
    rep.heatmap(np.array([[1.0, np.inf], [-np.inf, 0.0]]), ["a", "b"], ["x", "y"])
    rep.bar_chart([], e)
    rep.bar_chart(["a", "b"], np.array([np.nan, 0.0]), errors=np.array([np.nan, 1.0]))
    rep.bar_chart(["a", "b"], np.zeros(2), horizontal=False)
    page = rep.html()
    roots = _check_well_formed(page)
    assert len(roots) == 16
    assert page.count("no data") >= 6
    # no NaN/inf leaked into numeric SVG attributes
    for attr in re.findall(r'\b(?:x|y|x1|x2|y1|y2|cx|cy|width|height|r)="([^"]*)"', page):
        assert re.fullmatch(r"-?\d+(\.\d+)?", attr), attr
    for d in re.findall(r'\bd="([^"]*)"', page):
        assert "nan" not in d.lower() and "inf" not in d.lower()


def test_line_plot_breaks_on_nan_and_log_axis():
    rep = Report("l")
    rep.line_plot({"s": (np.arange(1.0, 6.0), np.array([1, 2, np.nan, 4, 5]))}, logx=True)
    (root,) = _check_well_formed(rep.html())
    path = next(p for p in root.iter(SVG_NS + "path") if p.get("stroke") == PALETTE[0])
    assert path.get("d").count("M") == 2
    assert len(list(root.iter(SVG_NS + "circle"))) == 4


def test_scatter_subsamples_deterministically():
    rng = np.random.default_rng(3)
    x, y = rng.random(3000), rng.random(3000)
    g = np.where(rng.random(3000) < 0.5, "a", "b")
    r1, r2 = Report("s"), Report("s")
    r1.scatter(x, y, groups=g, max_points=500)
    r2.scatter(x, y, groups=g, max_points=500)
    assert r1.html() == r2.html()
    (root,) = _check_well_formed(r1.html())
    pts = [c for grp in root.iter(SVG_NS + "g") if grp.get("class") == "points"
           for c in grp.findall(SVG_NS + "circle")]
    assert len(pts) == 500
    assert "showing a random 500 of 3,000 points" in r1.html()


def test_heatmap_cells_and_annotations():
    rep = Report("h")
    m = np.array([[0.1, 0.2, 0.3], [0.4, np.nan, 0.6]])
    rep.heatmap(m, ["r1", "r2"], ["c1", "c2", "c3"], value_format="{:.2f}")
    page = rep.html()
    (root,) = _check_well_formed(page)
    cells = [r for g in root.iter(SVG_NS + "g") if g.get("class") == "cells" for r in g.findall(SVG_NS + "rect")]
    assert len(cells) == 6
    for v in ("0.10", "0.30", "0.60", "n/a"):
        assert f">{v}</text>" in page
    # lowest and highest values get the two ends of the colour scale
    assert cells[0].get("fill") == "#440154" and cells[5].get("fill") == "#fde725"


def test_bar_chart_negative_and_errors():
    rep = Report("b")
    rep.bar_chart(["pos", "neg"], np.array([2.0, -1.0]), errors=np.array([0.5, 0.2]))
    (root,) = _check_well_formed(rep.html())
    bars = [r for g in root.iter(SVG_NS + "g") if g.get("class") == "bars" for r in g.findall(SVG_NS + "rect")]
    assert [b.get("fill") for b in bars] == [PALETTE[0], PALETTE[3]]
    w = [float(b.get("width")) for b in bars]
    assert w[0] / w[1] == pytest.approx(2.0, rel=1e-2)


# --------------------------------------------------------------------------- ticks / output
def test_nice_ticks_use_1_2_5_steps():
    for lo, hi in [(0, 1), (0.0013, 0.0871), (-3.7, 12.2), (1e5, 9.3e6), (5, 5), (-1e-9, 1e-9)]:
        ticks, step = _nice_ticks(lo, hi)
        mant = step / 10 ** math.floor(math.log10(step))
        assert any(math.isclose(mant, m) for m in (1, 2, 5)), (lo, hi, step)
        assert 2 <= len(ticks) <= 12
        blo, bhi, bt, _ = _nice_bounds(lo, hi)
        assert blo <= min(lo, hi) and bhi >= max(lo, hi)
    assert _nice_ticks(0, 1)[0] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert _log_ticks(0, 3) == [1, 10, 100, 1000]


def test_write_local_and_callable(tmp_path):
    rep = Report("w")
    rep.paragraph("hello")
    out = tmp_path / "sub" / "report.html"
    text = rep.write(str(out))
    assert out.read_bytes() == text.encode("utf-8")
    got = []
    rep.write(got.append)
    assert got == [text.encode("utf-8")]
