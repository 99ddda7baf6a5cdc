"""Counterfactual checks of values: do the values predict what models trained on other data do?

**LDS** (linear datamodeling score; Park et al., TRAK 2023; dattri). Draw ``M`` random subsets
``S_j`` of the training rows, each holding ``round(alpha n)`` rows (``alpha``: ``fraction``),
seeded per subset (``SeedSequence([seed, j])``, so subset ``j`` does not depend on ``M``). Train
a model on each and measure its outcome ``y_j`` (a validation metric, higher is better; a loss
enters negated). The values' additive prediction of subset ``j`` is
``g_j = sum_{r in S_j} v_r`` (unvalued rows count 0), and

    LDS = Spearman(g, y)  over the M subsets,

with a bootstrap standard error over subsets. LDS ~ 1: the values rank what the data does to
the model; ~ 0: no counterfactual signal (the ``random`` valuer's expected score).

**Per-user LDS** for values of interactions: for user ``u``, ``g_uj`` sums the values of
``u``'s rows kept in ``S_j`` and ``y_uj`` is ``u``'s own validation metric under model ``j``;
the per-user Spearman over subsets is averaged over the users whose ``g`` and ``y`` both vary
(SE over those users).

**Seed stability**: Spearman between the values of two valuations that differ only in the
training seed.

No Ray here: the subset trainings are work items the caller runs (:mod:`recval_ray.checks`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


def subset_mask(n: int, fraction: float, seed: int, j: int) -> np.ndarray:
    """Boolean ``[n]``: the rows of subset ``j`` (exactly ``round(fraction n)``, at least 1, of
    them), drawn from ``SeedSequence([seed, j])`` alone."""
    k = min(n, max(1, int(round(float(fraction) * n))))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(j)]))
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[:k]] = True
    return mask


def predicted_effects(values: np.ndarray, masks) -> np.ndarray:
    """``g_j = sum_{r in S_j} v_r`` for each mask (NaN values count 0)."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
    return np.array([v[m].sum() for m in masks], dtype=np.float64)


def subset_effects(values: dict, n: int, fraction: float, seed: int, subsets: int,
                   row_user: Optional[np.ndarray] = None, users: Optional[np.ndarray] = None) -> dict:
    """For every ``label -> values`` (one per row), ``g [M]`` (:func:`predicted_effects`) and,
    with ``row_user``/``users``, the per-user sums ``[M, len(users)]`` of the kept rows' values:
    one pass over the subsets, each drawn once and dropped (memory of one mask, not ``M``)."""
    vals = {k: np.nan_to_num(np.asarray(v, dtype=np.float64), nan=0.0) for k, v in values.items()}
    g = {k: np.empty(subsets) for k in vals}
    per_user = {k: [] for k in vals} if row_user is not None else None
    n_users = int(max(int(row_user.max(initial=-1)), int(np.max(users, initial=-1)))) + 1 if per_user is not None else 0
    for j in range(subsets):
        m = subset_mask(n, fraction, seed, j)
        for k, v in vals.items():
            g[k][j] = v[m].sum()
            if per_user is not None:
                per_user[k].append(np.bincount(row_user[m], weights=v[m], minlength=n_users)[users])
    return {k: {"g": g[k], "per_user": np.stack(per_user[k]) if per_user is not None else None} for k in vals}


def _ranks(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata
    return rankdata(a, axis=0)


def spearman(x, y) -> float:
    """Spearman's rho (average ranks for ties); NaN when either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])


def bootstrap_se(x, y, n_boot: int, seed: int) -> float:
    """Standard deviation of Spearman's rho over ``n_boot`` resamples of the pairs (seeded);
    resamples where a side is constant are skipped."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3 or n_boot <= 1:
        return float("nan")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x4C44]))
    idx = rng.integers(0, len(x), size=(int(n_boot), len(x)))
    rho = np.array([spearman(x[i], y[i]) for i in idx])
    rho = rho[np.isfinite(rho)]
    return float(rho.std(ddof=1)) if len(rho) > 1 else float("nan")


def per_user_spearman(pred: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Spearman over axis 0 for every column of ``pred``/``actual`` ``[M, users]``; NaN for a
    column where either side is constant."""
    pred, actual = np.asarray(pred, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    rp, ra = _ranks(pred), _ranks(actual)
    rp -= rp.mean(0)
    ra -= ra.mean(0)
    den = np.sqrt((rp * rp).sum(0) * (ra * ra).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rp * ra).sum(0) / den
    rho[~(den > 0)] = np.nan
    return rho


@dataclass
class LdsResult:
    """The LDS of one set of values against one outcome."""
    lds: float
    se: float
    subsets: int
    fraction: float
    outcome: str
    predicted: list = field(default_factory=list)     # g_j
    actual: list = field(default_factory=list)        # y_j
    per_user: Optional[dict] = None                   # {"mean", "se", "users"}

    def as_dict(self) -> dict:
        return {"lds": self.lds, "se": self.se, "subsets": self.subsets, "fraction": self.fraction,
                "outcome": self.outcome, "predicted": self.predicted, "actual": self.actual,
                "per_user": self.per_user}


def lds(values: np.ndarray, masks: list, outcomes, *, outcome: str, fraction: float,
        bootstrap: int = 1000, seed: int = 0) -> LdsResult:
    """LDS of ``values`` (one per training row) over the subsets ``masks`` with outcomes
    ``outcomes[j]`` (higher is better)."""
    return lds_of_effects(predicted_effects(values, masks), outcomes, outcome=outcome, fraction=fraction,
                          bootstrap=bootstrap, seed=seed)


def lds_of_effects(g: np.ndarray, outcomes, *, outcome: str, fraction: float, bootstrap: int = 1000,
                   seed: int = 0) -> LdsResult:
    """:func:`lds` from the predicted effects ``g_j`` already summed."""
    g = np.asarray(g, dtype=np.float64)
    y = np.asarray(outcomes, dtype=np.float64)
    return LdsResult(lds=spearman(g, y), se=bootstrap_se(g, y, bootstrap, seed), subsets=len(g),
                     fraction=float(fraction), outcome=outcome, predicted=g.tolist(), actual=y.tolist())


def per_user_lds(values: np.ndarray, row_user: np.ndarray, masks: list, user_outcomes: np.ndarray,
                 users: np.ndarray) -> dict:
    """Per-user LDS (module docstring): ``user_outcomes[j, k]`` is user ``users[k]``'s metric
    under model ``j``. Returns ``{"mean", "se", "users"}`` (users whose sides both vary)."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
    users = np.asarray(users, dtype=np.int64)
    n_users = int(max(int(row_user.max(initial=-1)), int(users.max(initial=-1))) + 1)
    pred = np.stack([np.bincount(row_user[m], weights=v[m], minlength=n_users)[users] for m in masks])
    return per_user_lds_of_effects(pred, user_outcomes, users)


def per_user_lds_of_effects(pred: np.ndarray, user_outcomes: np.ndarray, users: np.ndarray) -> dict:
    """:func:`per_user_lds` from the per-user sums ``pred [M, users]`` already summed."""
    rho = per_user_spearman(pred, np.asarray(user_outcomes, dtype=np.float64))
    ok = rho[np.isfinite(rho)]
    return {"mean": float(ok.mean()) if len(ok) else float("nan"),
            "se": float(ok.std(ddof=1) / np.sqrt(len(ok))) if len(ok) > 1 else float("nan"),
            "users": int(len(ok)), "users_evaluated": int(len(users))}


def seed_stability(values_a: np.ndarray, values_b: np.ndarray) -> float:
    """Spearman between two valuations of the same rows (rows valued in both)."""
    a, b = np.asarray(values_a, dtype=np.float64), np.asarray(values_b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    return spearman(a[ok], b[ok])
