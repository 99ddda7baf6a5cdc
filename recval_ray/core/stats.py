"""Statistics over repeated runs (seeds): the one place their mean, spread and standard error
are computed, for comparisons, sweeps and the valuers' removal experiments.

``std`` is the sample standard deviation (ddof = 1) and ``se = std / sqrt(n)``; both are NaN with
fewer than two values. ``nan=True`` ignores NaN entries (and counts only the others in ``n``).
"""
from __future__ import annotations

import math

import numpy as np


def over_seeds(values, nan: bool = False) -> dict:
    """``{mean, std, se, n}`` of a 1-D sequence of per-seed values."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if nan:
        x = x[~np.isnan(x)]
    n = int(len(x))
    mean = float(np.mean(x)) if n else float("nan")
    std = float(np.std(x, ddof=1)) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "se": std / math.sqrt(n) if n > 1 else float("nan"), "n": n}


def standard_error(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """Element-wise standard error over ``axis`` (NaN-aware, ddof = 1; NaN with one seed)."""
    x = np.asarray(x, dtype=np.float64)
    S = x.shape[axis]
    if S < 2:
        return np.full(np.delete(np.array(x.shape), axis), np.nan)
    return np.nanstd(x, axis=axis, ddof=1) / math.sqrt(S)
