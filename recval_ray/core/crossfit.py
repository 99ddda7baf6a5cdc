"""Cross-fitted values of the whole log (``valuation.coverage: all``).

The train-only valuation values the training split with the base model that trained on it; the
validation and test rows (30% of a 70/10/20 split) never get a value. Cross-fitting values every
row the same way, by a model that did not train on it:

* every row of every split gets a fold ``f(r) in {0..K-1}``: within each (split, user) the rows
  are shuffled (seeded) and dealt round robin from a random first fold, so every fold holds about
  ``1/K`` of every user's rows (:func:`assign_folds`);
* fold model ``k`` is the job's model trained on the training rows outside fold ``k``, with early
  stopping on the validation rows outside fold ``k`` (test is never trained on nor selected on);
* each row ``r`` of fold ``k`` (train, valid or test) gets the statistic of the valuer under fold
  model ``k``: for the loss valuers the held-out BPR loss
  ``l(u, i) = mean_j softplus(s_uj - s_ui)`` against ``train.loss_negatives`` sampled negatives
  (:func:`heldout_losses`), then the valuer's own transform (small-loss: ``-l``; pld: ``-z``, the
  loss standardised within the user over all the user's rows).

So every value is an out-of-sample score on one scale (K models trained alike on ``(K-1)/K`` of
the training data), as in cross-validated label-noise detection (confident learning). A user with
no training rows outside fold ``k`` is scored by an untrained user vector there (counted in
``cold_rows``). Ray-free: the caller passes its training function.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from .data import Interactions, Split

PARTS = ("train", "valid", "test")
SET_ASIDE = "set-aside"     # values/ split label of an input row no split holds (no value)
COVERAGES = ("auto", "train", "all")
OWN_DATA_FORMATS = ("csv", "tsv", "parquet")    # a user's own log (not a benchmark's files)


@dataclass
class PartValues:
    """Cross-fitted values of one split's rows: ``values``, ``fold`` and method ``columns``."""
    values: np.ndarray
    fold: np.ndarray
    columns: dict = field(default_factory=dict)


@dataclass
class WholeLog:
    """What ``valuation.coverage: all`` adds to a :class:`~.valuers.base.Valuation`: the
    cross-fitted values of the validation and test rows (the training rows' are the
    valuation's own ``values``), every row's fold and the fold models' facts."""
    folds: int
    parts: dict                 # "train" / "valid" / "test" -> PartValues
    fold_models: list = field(default_factory=list)
    cold_rows: int = 0
    seconds: float = 0.0
    statistic: Optional[np.ndarray] = None   # the per-row held-out statistic, train/valid/test order

    def revalue(self, values: np.ndarray, columns: dict) -> "WholeLog":
        """The same folds and statistic, valued by another method (``values`` and ``columns``
        over every row, train/valid/test order)."""
        at = np.cumsum([0] + [len(self.parts[p].fold) for p in PARTS])
        parts = {p: PartValues(values=values[at[j]:at[j + 1]], fold=self.parts[p].fold,
                               columns={k: v[at[j]:at[j + 1]] for k, v in columns.items()})
                 for j, p in enumerate(PARTS)}
        return WholeLog(self.folds, parts, self.fold_models, self.cold_rows, self.seconds, self.statistic)

    def info(self) -> dict:
        return {"coverage": "all", "folds": self.folds,
                "rows_valued": {p: int(len(v.fold)) for p, v in self.parts.items()},
                "cold_rows": int(self.cold_rows), "fold_models": self.fold_models,
                "seconds": round(self.seconds, 3),
                "how": ("each row valued by the fold model trained without its fold "
                        "(training rows outside the fold, early stopping on validation rows outside it)")}


def resolve_coverage(coverage: str, data_format: str, noise_ratio: float, split_kind: str,
                     can_crossfit: bool) -> str:
    """``auto``: ``all`` for a user's own log (CSV, TSV or Parquet input, no injected noise, the
    job's own split) when the valuer and model can cross-fit, else ``train`` (benchmark
    protocols value the training split)."""
    if coverage != "auto":
        return coverage
    own = data_format in OWN_DATA_FORMATS and noise_ratio == 0 and split_kind != "given"
    return "all" if own and can_crossfit else "train"


def assign_folds(user: np.ndarray, n_users: int, k: int, seed) -> np.ndarray:
    """Fold of each row (``int8``, ``0..k-1``): within each user the rows are shuffled and dealt
    round robin starting from a random fold, so a user's rows spread as evenly as they can and
    users with fewer than ``k`` rows do not all land in fold 0. Vectorised: one lexsort."""
    if not 2 <= k <= 127:
        raise ValueError(f"folds: {k} is not in 2..127")
    user = np.asarray(user)
    n = len(user)
    rng = np.random.default_rng(seed)
    key = rng.random(n)
    start = rng.integers(0, k, size=max(int(n_users), 1))
    order = np.lexsort((key, user))
    u = user[order]
    first = np.r_[0, np.flatnonzero(np.diff(u)) + 1] if n else np.zeros(0, dtype=np.int64)
    rank = np.arange(n) - np.repeat(first, np.diff(np.r_[first, n]))
    fold = np.empty(n, dtype=np.int8)
    fold[order] = ((rank + start[u]) % k).astype(np.int8)
    return fold


def heldout_losses(result, rows: Interactions, seed, negatives: int) -> np.ndarray:
    """The BPR loss of each of ``rows`` under ``result``'s model (trained without them), against
    ``negatives`` negatives drawn by the model's own sampler from a stream seeded by ``seed``."""
    return task_losses(result.task, rows, seed, negatives)


def task_losses(task, rows: Interactions, seed, negatives: int) -> np.ndarray:
    """:func:`heldout_losses` of a task's current model."""
    if not hasattr(task, "pair_losses"):
        raise ValueError("valuation.coverage: all scores rows a model was not trained on, which needs a "
                         "BPR-trained model (model.kind mf or lightgcn)")
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    state = ss.generate_state(2, dtype=np.uint32)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    chunk = max(4096, (1 << 19) // max(1, int(negatives)))
    loss = task.pair_losses(rows.user, rows.item, gen, int(negatives), chunk)
    return loss.detach().cpu().numpy().astype(np.float64)


def crossfit(split: Split, folds: int, seed: int, train_fn: Callable, statistic: Callable,
             progress: Optional[Callable[[str], None]] = None) -> tuple[dict, WholeLog]:
    """Cross-fit ``statistic(result, rows, seed) -> per-row array`` over the whole log.

    ``train_fn(train_rows, valid_rows, tag) -> TrainResult``: the job's training. Returns the
    per-part statistic (``{"train"|"valid"|"test": array}``, aligned with ``split``'s rows) and a
    :class:`WholeLog` holding every row's fold (its ``values`` are filled by the valuer)."""
    t0 = time.perf_counter()
    ss = np.random.SeedSequence([int(seed), 0xC5F1])
    part_seed, fold_seed = ss.spawn(2)
    parts = {p: getattr(split, p) for p in PARTS}
    fold = {p: assign_folds(rows.user, rows.n_users, folds, s)
            for (p, rows), s in zip(parts.items(), part_seed.spawn(len(PARTS)))}
    stat = {p: np.full(len(rows), np.nan) for p, rows in parts.items()}
    models, cold = [], 0
    score_seeds = fold_seed.spawn(folds)
    for k in range(folds):
        tr = parts["train"].take(fold["train"] != k)
        va = parts["valid"].take(fold["valid"] != k)
        if progress:
            progress(f"cross-fitting: fold {k + 1}/{folds}, training on {len(tr)} rows")
        res = train_fn(tr, va, f"fold {k + 1}/{folds}")
        seen = np.zeros(tr.n_users, dtype=bool)
        seen[tr.user] = True
        for (p, rows), s in zip(parts.items(), score_seeds[k].spawn(len(PARTS))):
            at = np.flatnonzero(fold[p] == k)
            if len(at):
                sub = rows.take(at)
                stat[p][at] = statistic(res, sub, s)
                cold += int((~seen[sub.user]).sum())
        models.append({"fold": k, "train_rows": int(len(tr)), "valid_rows": int(len(va)),
                       "best_epoch": int(res.best_epoch), "best_valid": float(res.best_valid),
                       "seconds": round(float(res.seconds), 3)})
        if hasattr(res.task, "release_data"):
            res.task.release_data()
        del res
    whole = WholeLog(folds=folds, parts={p: PartValues(values=np.empty(0), fold=fold[p]) for p in PARTS},
                     fold_models=models, cold_rows=cold, seconds=time.perf_counter() - t0)
    return stat, whole


def all_rows(split: Split) -> Interactions:
    """The rows of train, valid and test, in that order (the whole log's valued rows)."""
    return split.train.concat(split.valid).concat(split.test)
