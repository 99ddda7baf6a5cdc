"""Evaluation protocol pieces shared by the pipeline and the valuers.

* :func:`drop_unseen`: validation/test interactions whose user or item never occurs in the
  training split cannot be ranked meaningfully; they leave evaluation with a counted warning
  (an error in strict mode).
* :func:`evaluate_ranking`: the configured ranking metrics on a held-out part, full ranking,
  with the training and validation items excluded (test) or the training items (validation).
* :func:`noise_detection`: how well low values find the injected interactions: ROC AUC of
  ``-value`` for ``is_noise`` (Mann-Whitney, ties averaged) and precision among the
  ``n_noise`` lowest values.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from scipy.stats import rankdata

from ..errors import InputError
from .data import Interactions, Split
from .metrics import ranking_metrics, rating_metrics


def drop_unseen(split: Split, strict: bool = False) -> tuple[Split, list[str]]:
    """Remove valid/test rows whose user or item has no training interaction."""
    seen_u = split.train.user_counts() > 0
    seen_i = split.train.item_counts() > 0
    parts, warnings = {}, []
    for name in ("valid", "test"):
        part = getattr(split, name)
        ok = seen_u[part.user] & seen_i[part.item]
        n_bad = int((~ok).sum())
        if n_bad:
            users = int(len(np.unique(part.user[~seen_u[part.user]])))
            items = int(len(np.unique(part.item[~seen_i[part.item]])))
            msg = (f"{n_bad} {name} interactions left out of evaluation: {users} users and "
                   f"{items} items absent from training")
            if strict:
                raise InputError(f"strict mode: {msg}", column="user/item")
            warnings.append(msg)
        parts[name] = part.take(ok)
    return Split(split.train, parts["valid"], parts["test"]), warnings


def set_context(model, parts: Sequence[Interactions]) -> None:
    """Sequential models condition their scores on the interactions before the target part
    (train for validation, train + validation for test); others ignore this."""
    if hasattr(model, "set_context"):
        model.set_context(list(parts))


def evaluate_ranking(model, split: Split, eval_cfg, part: str = "test",
                     exclude: Optional[Sequence[Interactions]] = None,
                     context: Optional[Sequence[Interactions]] = None) -> dict:
    """Ranking metrics of ``model`` on ``split.<part>``; training (+ validation for test) excluded.

    ``context``: what context models (autoencoders, sequence models) read as the users'
    histories; by default the parts before the target (train, + valid for test). A model
    retrained on pruned data reads the kept rows (+ valid), while ``exclude`` stays the full
    training set so every variant is ranked against the same candidates.
    Rating models (``model.explicit``) on rated data also get MAE, RMSE and explained variance.
    """
    target = getattr(split, part)
    if exclude is None:
        exclude = [split.train] if part == "valid" else [split.train, split.valid]
    if context is None:
        context = [split.train] if part == "valid" else [split.train, split.valid]
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    set_context(model, context)
    rating = {}
    if getattr(model, "explicit", False) and target.rating is not None and len(target):
        from .train import predict_ratings
        rating = rating_metrics(predict_ratings(model, target), target.rating)
    with torch.no_grad():
        out = ranking_metrics(model.score_users, target, list(exclude), metrics=list(eval_cfg.metrics),
                              ks=list(eval_cfg.ks), ndcg_variant=eval_cfg.ndcg_variant,
                              recall_variant=eval_cfg.recall_variant, users=eval_cfg.users,
                              batch_users=eval_cfg.batch_users, device=dev)
    model.train(was)
    return {k: float(v) for k, v in out.items()} | {k: float(v) for k, v in rating.items()}


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC = P(score of a positive > score of a negative), ties counted 1/2."""
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def noise_detection(values: np.ndarray, is_noise: np.ndarray) -> dict:
    """AUC of ``-value`` for the noise flag, and precision among the ``n_noise`` lowest values."""
    values = np.asarray(values, dtype=np.float64)
    is_noise = np.asarray(is_noise, dtype=bool)
    ok = ~np.isnan(values)
    v, y = values[ok], is_noise[ok]
    n = int(y.sum())
    if n == 0:
        return {"n_noise": 0, "auc": float("nan"), "precision_at_n": float("nan")}
    # precision among the n lowest values, ties at the cut taken in expectation over a
    # random tie order (noise rows are appended last, so row order would favour clean rows)
    cut = np.partition(v, n - 1)[n - 1]
    below, tied = v < cut, v == cut
    hits = y[below].sum() + (n - below.sum()) * y[tied].mean()
    return {"n_noise": n, "n_valued": int(ok.sum()), "auc": roc_auc(-v, y),
            "precision_at_n": float(hits / n), "base_rate": float(y.mean())}
