"""The verdict: should the user prune, by which valuer, how much, and is the gain real?

Candidates are prunings ``(method, fraction, scope)`` of the valued training rows. Each is
retrained and scored on **validation** (the job's ``train.select_metric``); the best one is
compared with keeping everything, and the decision is taken on validation only:

    prune  iff  delta_valid > 0  and  the lower end of its bootstrap CI over validation users > 0

where ``delta = mean_u m_pruned(u) / mean_u m_full(u) - 1`` (relative change of the metric's
mean over the same users). The chosen pruning is then *reported* on **test**, whatever the
decision: the relative change, a paired percentile bootstrap CI over test users (users
resampled with replacement, the same draw for both models), and a paired t-test, over seeds
when the verdict trains more than one seed (per-seed means), else over test users (per-user
metrics, one seed). ``vs_random``: the test change of a random pruning of as many rows.

Ray-free: the statistics here, the orchestration in :mod:`recval_ray.decision`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np

SCOPES = ("global", "per-user")


@dataclass
class VerdictConfig:
    """``verdict:`` of a job. ``methods`` x ``fractions`` x ``scopes`` are the candidate
    prunings: ``methods`` empty (default) = the run's valuer and every method that values from
    what the base model's training recorded, at no training of its own (small-loss and pld on a
    BPR-trained model); or a list like ``compare.methods`` (names or ``{method, label, ...}``),
    the run's valuer always first. Candidates whose drop sets coincide are retrained once.
    ``seeds`` the training seeds of the test report (default: ``[train.seed]``, i.e. the base
    model itself; two or more give the paired test over seeds); ``bootstrap`` resamples of the
    CI at ``confidence``, drawn with ``seed``. ``actors`` > 0 on Ray: the retrainings run on
    that many Ray actors of ``cpus`` each (in-process training only), with the same results."""
    enabled: bool = True
    methods: list[Union[str, dict]] = field(default_factory=list)
    actors: int = 0          # on Ray: retrain this many candidates at once on actors (0: in the driver)
    cpus: float = 1.0        # per actor
    fractions: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])
    scopes: list[str] = field(default_factory=lambda: ["global", "per-user"])
    seeds: list[int] = field(default_factory=list)
    bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def validate(self, key: str = "verdict") -> None:
        if not self.fractions:
            raise ValueError(f"{key}.fractions: give at least one fraction")
        for f in self.fractions:
            if not 0.0 < f < 1.0:
                raise ValueError(f"{key}.fractions: {f} is not in (0, 1)")
        bad = [s for s in self.scopes if s not in SCOPES]
        if bad or not self.scopes:
            raise ValueError(f"{key}.scopes: {bad or self.scopes} (each one of {', '.join(SCOPES)})")
        if self.bootstrap < 100:
            raise ValueError(f"{key}.bootstrap: {self.bootstrap} resamples are too few (>= 100)")
        if not 0.5 < self.confidence < 1.0:
            raise ValueError(f"{key}.confidence: {self.confidence} is not in (0.5, 1)")
        if self.actors < 0 or self.cpus <= 0:
            raise ValueError(f"{key}.actors must be >= 0 and {key}.cpus > 0")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"{key}.seeds: {self.seeds} repeats a seed")


def relative_change(full: np.ndarray, pruned: np.ndarray) -> float:
    """``mean(pruned) / mean(full) - 1`` (NaN when the full model's mean is 0)."""
    a, b = float(np.mean(full)), float(np.mean(pruned))
    return b / a - 1.0 if a else float("nan")


def bootstrap_relative_change(full: np.ndarray, pruned: np.ndarray, resamples: int = 1000,
                              confidence: float = 0.95, seed: int = 0, chunk: int = 64
                              ) -> tuple[float, float]:
    """Paired percentile bootstrap CI of :func:`relative_change` over the users (rows of the
    two aligned arrays): each resample draws ``n`` users with replacement and takes both
    models' means over the same draw. ``chunk`` resamples at a time (``chunk x n`` indices)."""
    a = np.asarray(full, dtype=np.float64)
    b = np.asarray(pruned, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples of equal length expected, got {a.shape} and {b.shape}")
    n = len(a)
    if n < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for s in range(0, resamples, chunk):
        m = min(chunk, resamples - s)
        idx = rng.integers(0, n, size=(m, n))
        ma = a[idx].mean(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            stats[s:s + m] = b[idx].mean(1) / ma - 1.0
    stats = stats[np.isfinite(stats)]
    if not len(stats):
        return float("nan"), float("nan")
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(stats, [tail, 1.0 - tail])
    return float(lo), float(hi)


def paired_t_test(full: Sequence[float], pruned: Sequence[float]) -> tuple[float, float]:
    """Two-sided paired t-test of ``pruned - full``: ``(t, p)`` with ``t = mean(d) / (sd(d) /
    sqrt(n))`` and ``n - 1`` degrees of freedom; NaN below two pairs; all differences equal:
    ``p = 1`` when they are 0, else ``p = 0``."""
    from scipy.special import stdtr

    d = np.asarray(pruned, dtype=np.float64) - np.asarray(full, dtype=np.float64)
    n = len(d)
    if n < 2:
        return float("nan"), float("nan")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:
        return (0.0, 1.0) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0)
    t = mean / (sd / math.sqrt(n))
    return float(t), float(2.0 * stdtr(n - 1, -abs(t)))


@dataclass
class Candidate:
    """One candidate pruning and its validation score (``valid``: the selection metric of the
    model retrained without the dropped rows, at its selected epoch)."""
    method: str
    fraction: float
    scope: str
    dropped: int
    valid: float
    same_as: Optional[str] = None     # the earlier candidate with the same drop set (not retrained)

    def label(self) -> str:
        scope = "per user" if self.scope == "per-user" else "globally"
        return f"{self.method} {self.fraction:.0%} {scope}"


def best_candidate(candidates: Sequence[Candidate]) -> Candidate:
    """The highest validation score; ties go to the smaller fraction, then the listed order."""
    if not candidates:
        raise ValueError("no candidate pruning to choose from")
    order = sorted(range(len(candidates)), key=lambda i: (-candidates[i].valid, candidates[i].fraction, i))
    return candidates[order[0]]


def decide(delta_valid: float, valid_ci_low: float) -> str:
    """``prune`` when the best pruning beats keeping everything on validation beyond the
    bootstrap noise (``delta_valid > 0`` and the CI's lower end ``> 0``), else ``keep``."""
    return "prune" if (delta_valid > 0 and valid_ci_low > 0) else "keep"


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:+.1%}"


def sentence(v: dict) -> str:
    """The verdict in one sentence, from the ``verdict`` record of ``metrics.json``."""
    what = Candidate(v["method"], v["fraction"], v["scope"], v.get("dropped", 0), v.get("valid", 0.0)).label()
    metric = v["metric"].replace("recall", "Recall").replace("ndcg", "NDCG").replace("precision", "Precision")
    ci = f"{int(round(v['confidence'] * 100))}% CI {_pct(v['ci_low'])}..{_pct(v['ci_high'])}"
    p = "n/a" if v.get("p_value") is None or not math.isfinite(v["p_value"]) else f"{v['p_value']:.2g}"
    test = f"{metric} by {_pct(v['delta_test'])} on test ({ci}, p {p})"
    rnd = f"; random pruning of as many rows: {_pct(v['vs_random'])}" if v.get("vs_random") is not None else ""
    if v["decision"] == "prune":
        return (f"Prune: dropping {what} ({v.get('dropped', 0):,} rows) changes {test}, "
                f"chosen on validation ({_pct(v['delta_valid'])}){rnd}.")
    return (f"Keep everything: the best pruning found, {what}, changes {test}; on validation "
            f"{_pct(v['delta_valid'])} (CI low {_pct(v['valid_ci_low'])}), not a gain beyond noise{rnd}.")
