"""The report of a ``recval compare`` over a ``compare.grid`` (see :mod:`recval_ray.grid`).

One table of every cell x variant (mean +- std over seeds per metric of the job), the relative
differences to each cell's ``full``, and for every numeric grid key (e.g. ``noise.ratio``) a
line plot of each metric against it: one line per combination of the other keys' values, for
variant ``full`` (or the first variant when ``full`` is not compared). The report's line plot
has no error bars: the lines are means, the table gives the std. With compared methods, a
table of every (cell, method) first (:func:`method_rows`: noise AUC, pruned vs random vs full
vs oracle). Then noise detection per cell, the first cell's value distributions and the
training runs.
"""
from __future__ import annotations

import numpy as np

from .report import Report, value_distributions


def _cell(st: dict) -> str:
    return f"{st['mean']:.4f}" + ("" if st["std"] != st["std"] else f" \u00b1 {st['std']:.4f}")


def _rel(st: dict) -> str:
    return f"{100 * st['mean']:+.2f}%" + ("" if st["std"] != st["std"] else f" \u00b1 {100 * st['std']:.2f}")


def grid_lines(metrics: dict, key: str, metric: str, variant: str) -> dict:
    """``{series name: (x, mean)}``: ``metric`` of ``variant`` against the numeric grid key
    ``key``, one series per combination of the other keys' values (in cell order), points
    sorted by x."""
    others = [k for k in metrics["grid"]["keys"] if k != key]
    series: dict = {}
    for c in metrics["cells"]:
        st = c.get("summary", {}).get(variant, {}).get(metric)
        if st is None:
            continue
        name = ", ".join(f"{k}={c['values'][k]}" for k in others) or variant
        series.setdefault(name, []).append((float(c["overrides"][key]), st["mean"]))
    out = {}
    for name, pts in series.items():
        pts.sort()
        out[name] = (np.array([p[0] for p in pts]), np.array([p[1] for p in pts]))
    return out


def method_rows(metrics: dict) -> list[dict]:
    """One row per cell and compared method: its noise-detection AUC and, per metric, the
    test score after pruning by its values next to the same count of random rows, the cell's
    full model and its oracle (means +- std over seeds): every method on one line, whatever
    base model its cell trains."""
    rows = []
    names: list = []
    for c in metrics["cells"]:
        for st in c.get("summary", {}).values():
            names += [k for k in st if k not in names]
    for c in metrics["cells"]:
        if not c.get("ran"):
            continue
        summ, det = c.get("summary", {}), c.get("noise_detection", {})
        for m in c.get("methods", []):
            row = {"cell": c["cell"], "model": c.get("model", ""), "method": m}
            if m in det:
                row["noise AUC"] = _cell(det[m]["auc"])
            for variant, label in ((f"pruned:{m}", "pruned"), (f"random:{m}", "random"), ("full", "full"),
                                   ("oracle", "oracle")):
                for k in names:
                    if k in summ.get(variant, {}):
                        row[f"{label} {k}"] = _cell(summ[variant][k])
            rows.append(row)
    return rows


def build_compare_grid_report(cfg, run_id: str, metrics: dict, values: dict, setting: dict) -> str:
    seeds = metrics["seeds"]
    grid = metrics["grid"]
    keys = grid["keys"]
    cells = metrics["cells"]
    ran = [c for c in cells if c.get("ran")]
    rep = Report(f"recval comparison {run_id}",
                 f"{', '.join(metrics.get('models', [cfg.model.kind]))}: a grid of {len(cells)} configurations "
                 f"({', '.join(keys)}) over {len(seeds)} seed(s)")
    setting = dict(setting)
    for name, root in (("data", "data"), ("split", "split"), ("noise ratio", "noise"), ("model", "model"),
                       ("valuation", "valuation"), ("prune", "prune")):
        if name in setting and any(k.split(".")[0] == root for k in keys):
            setting[name] = f"{setting[name]} (the job's; the grid changes it)"
    rep.key_values(setting | {
        "grid": "; ".join(f"{k}: {', '.join(v)}" for k, v in grid["values"].items()),
        "grid mode": grid["mode"], "cells": len(cells),
        "seeds": ", ".join(map(str, seeds)), "seeds vary": ", ".join(metrics["vary"]),
        "methods": ", ".join(metrics["methods"]) or "none (no valuation)",
        "variants": ", ".join(metrics["variants"])}
        | {k: v for k, v in metrics["data"].items() if k != "warnings"})
    for w in metrics["data"].get("warnings", []):
        rep.paragraph(f"Warning: {w}")
    rep.paragraph("Each cell is the job with the overrides of its grid values (as --set), compared over "
                  "the seeds. full: the model on all (noisy) training data; pruned:M / random:M: retrained "
                  "without what method M prunes / as many random interactions; oracle: retrained without "
                  "the injected noise. Every model selected on validation, evaluated on test; mean \u00b1 "
                  "sample standard deviation over seeds.")
    skipped = [c for c in cells if c["skipped_variants"]]
    for c in skipped:
        rep.paragraph(f"Cell {c['label']}: variant(s) {', '.join(c['skipped_variants'])} skipped (they do not "
                      f"apply to it)" + ("" if c.get("ran") else "; nothing else to run, the cell is skipped"))

    mrows = method_rows(metrics)
    if mrows and len(mrows) > 1:
        rep.heading("Methods compared (mean \u00b1 std over seeds)")
        cols = list(dict.fromkeys(k for r in mrows for k in r))
        rep.table(mrows, cols, caption="each method on its cell's base model: noise-detection ROC AUC of -value, "
                                       "test metrics after pruning by its values (pruned), after pruning as many "
                                       "random rows (random), on all data (full) and without the injected rows "
                                       "(oracle)")

    first = next((st for c in ran for st in c["summary"].values()), {})
    names = list(first)
    rep.heading("Test metrics per cell (mean \u00b1 std over seeds)")
    rows = [{"cell": c["cell"], **c["values"], "variant": label, **{k: _cell(st[k]) for k in names if k in st}}
            for c in ran for label, st in c["summary"].items()]
    rep.table(rows, ["cell"] + keys + ["variant"] + names)
    rel_rows = [{"cell": c["cell"], **c["values"], "variant": label, **{k: _rel(st[k]) for k in names if k in st}}
                for c in ran for label, st in c.get("relative_to_full", {}).items()]
    if rel_rows:
        rep.table(rel_rows, ["cell"] + keys + ["variant"] + names,
                  caption="relative difference to the cell's full model, paired by seed (%)")

    plotted = [k for k in grid["numeric"] if len(grid["values"][k]) > 1]
    variant = "full" if "full" in metrics["variants"] else (metrics["variants"] or ["full"])[0]
    for key in plotted:
        rep.heading(f"Test metrics against {key} ({variant}, mean over seeds)")
        for metric in names:
            rep.line_plot(grid_lines(metrics, key, metric, variant),
                          title=f"test {metric} vs {key} ({variant}, mean over {len(seeds)} seeds)",
                          xlabel=key, ylabel=metric)

    nd_rows = [{"cell": c["cell"], **c["values"], "method": m, "AUC of -value": _cell(st["auc"]),
                "precision@n_noise": _cell(st["precision_at_n"])}
               for c in ran for m, st in c.get("noise_detection", {}).items()]
    if nd_rows:
        rep.heading("Noise detection")
        rep.table(nd_rows, caption="per cell and method, mean \u00b1 std over seeds (precision among the "
                                   "n_noise lowest values)")
    first_cell = next((c for c in ran if values.get(c["cell"])), None)
    if first_cell is not None:
        rep.heading(f"Value distributions (cell {first_cell['label']}, seed {seeds[0]})")
        value_distributions(rep, values[first_cell["cell"]])
    rep.heading("Training runs")
    cols = ["cell", "seed", "variant", "method", "n_train", "dropped", "noise_dropped", "best_epoch",
            "epochs_run", "best_valid", "seconds"]
    rep.table(metrics.get("runs", []), cols)
    return rep.html()


def methods_markdown(metrics: dict) -> str:
    """:func:`method_rows` as a Markdown table (the README's comparison tables)."""
    rows = method_rows(metrics)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(k, "-")).replace("\u00b1", "+-") for k in cols) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m recval_ray.report_grid <compare run>/metrics.json
    import json
    import sys
    with open(sys.argv[1], encoding="utf-8") as fh:
        print(methods_markdown(json.load(fh)))
