"""The removal experiment, one for every valuer that runs one: retrain without a group of training
data chosen by its values (e.g. the most influential users, the strongest opponents), next to the
full data and to a random group of the same size, under several seeds, and compare test metrics.

Two tables, the same layout for every method:

* ``removal_experiment`` (long, one row per training and metric): ``variant, seed, metric, value``
  plus the method's own columns (e.g. ``protocol``, ``examples``);
* ``removal_summary`` (one row per variant and metric): ``mean, std, se, n_seeds`` over seeds and,
  paired by seed with the baseline variant ``b``,
  ``relative_diff = mean_s (m_v,s - m_b,s) / m_b,s`` with its ``relative_std`` and ``relative_se``
  (0 for the baseline itself; a seed whose baseline metric is 0 is left out of the relative figures).

Statistics come from :func:`~.stats.over_seeds` (ddof 1; NaN with one seed).
"""
from __future__ import annotations

import numpy as np

from .stats import over_seeds

LONG_COLUMNS = ("variant", "seed", "metric", "value")
SUMMARY_COLUMNS = ("variant", "metric", "mean", "std", "se", "n_seeds", "relative_diff", "relative_std",
                   "relative_se")


def long_table(variants: list, seeds: list, metrics: list, scores, extra: dict | None = None) -> dict:
    """The long table of ``scores[s, v, k]`` (seed ``s``, variant ``v``, metric ``k``);
    ``extra[col]`` is an array ``[S, V]`` (per training) or ``[S, V, K]`` of further columns."""
    scores = np.asarray(scores, np.float64)
    S, V, K = scores.shape
    if (S, V, K) != (len(seeds), len(variants), len(metrics)):
        raise ValueError(f"scores of shape {scores.shape} for {len(seeds)} seeds, {len(variants)} variants, "
                         f"{len(metrics)} metrics")
    s, v, k = (a.reshape(-1) for a in np.meshgrid(np.arange(S), np.arange(V), np.arange(K), indexing="ij"))
    out = {"variant": [str(variants[i]) for i in v], "seed": [int(seeds[i]) for i in s],
           "metric": [str(metrics[i]) for i in k], "value": [float(x) for x in scores.reshape(-1)]}
    for col, a in (extra or {}).items():
        a = np.asarray(a)
        a = np.broadcast_to(a[..., None], (S, V, K)) if a.ndim == 2 else a
        out[col] = a.reshape(-1).tolist()
    return out


def summarise(table: dict, baseline: str) -> dict:
    """The summary table of a long table (see the module docstring); variants and metrics keep
    their order of first appearance."""
    variants = list(dict.fromkeys(table["variant"]))
    metrics = list(dict.fromkeys(table["metric"]))
    seeds = list(dict.fromkeys(table["seed"]))
    if baseline not in variants:
        raise ValueError(f"baseline variant {baseline!r} not among {variants}")
    grid = np.full((len(seeds), len(variants), len(metrics)), np.nan)
    vi, mi, si = ({x: i for i, x in enumerate(xs)} for xs in (variants, metrics, seeds))
    for v, s, m, x in zip(table["variant"], table["seed"], table["metric"], table["value"]):
        grid[si[s], vi[v], mi[m]] = x
    base = grid[:, vi[baseline], :]
    rel = (grid - base[:, None, :]) / np.where(base == 0, np.nan, base)[:, None, :]
    rows = {c: [] for c in SUMMARY_COLUMNS}
    for v, variant in enumerate(variants):
        for k, metric in enumerate(metrics):
            st = over_seeds(grid[:, v, k], nan=True)
            r = {"mean": 0.0, "std": 0.0, "se": 0.0} if variant == baseline else over_seeds(rel[:, v, k], nan=True)
            for col, x in (("variant", variant), ("metric", metric), ("mean", st["mean"]), ("std", st["std"]),
                           ("se", st["se"]), ("n_seeds", st["n"]), ("relative_diff", r["mean"]),
                           ("relative_std", r["std"]), ("relative_se", r["se"])):
                rows[col].append(x)
    return rows


def report_section(rep, summary: dict, title: str, first: tuple = (), note: str = "") -> None:
    """A removal experiment's summary (:mod:`recval_ray.core.removal`, any method): the baseline
    variant's test metrics (mean +- standard error over seeds) and each other variant's relative
    difference to it, paired by seed (mean +- standard error)."""
    rep.heading(title, level=3)
    names = list(dict.fromkeys(summary["metric"]))
    names = [n for n in first if n in names] + [n for n in names if n not in first]
    variants = list(dict.fromkeys(summary["variant"]))
    cells = {(v, m): i for i, (v, m) in enumerate(zip(summary["variant"], summary["metric"]))}
    rows = []
    for j, variant in enumerate(variants):
        row = {"train data": variant.replace("_", " ")}
        for m in names:
            i = cells[(variant, m)]
            row[m] = (f"{summary['mean'][i]:.4f} +- {summary['se'][i]:.4f}" if j == 0 else
                      f"{100 * summary['relative_diff'][i]:+.2f}% +- {100 * summary['relative_se'][i]:.2f}")
        rows.append(row)
    n = max(summary["n_seeds"]) if summary["n_seeds"] else 0
    rep.table(rows, ["train data"] + names,
              caption=f"test split, {n} seeds. First row: mean +- standard error over seeds; others: relative "
                      f"difference to the first row, paired by seed, +- its standard error" + (f" ({note})" if note else ""))
