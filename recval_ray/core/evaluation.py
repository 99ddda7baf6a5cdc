"""Evaluation protocol pieces shared by the pipeline and the valuers.

* :func:`drop_unseen`: validation/test interactions whose user or item never occurs in the
  training split cannot be ranked meaningfully; they leave evaluation with a counted warning
  (an error in strict mode).
* :func:`evaluate_ranking`: the configured ranking metrics on a held-out part, full ranking,
  with the training and validation items excluded (test) or the training items (validation).
* :func:`evaluation_users` / :func:`sample_users`: with ``evaluate.sample_users: N`` > 0, the
  metrics of a held-out part (validation during training, test at the end) average over a
  seeded sample of N of its eligible users (those with at least one row in that part, or
  every user for ``evaluate.users: all``) instead of all of them. The sample is a function
  of ``evaluate.sample_seed`` and the part's eligible users only (never of the model or of
  the call order), so the base, pruned and random-control models are scored on the same
  users: each user gets a priority, a 64-bit hash of ``(sample_seed, user index)``, and the
  N eligible users of lowest priority are taken (a bottom-N sample: the sample of N is
  contained in the sample of N + 1, and a user sampled for test is preferred for validation
  too). With N >= the number of eligible users the evaluation is the full one, exactly.
* :func:`noise_detection`: how well low values find the injected interactions: ROC AUC of
  ``-value`` for ``is_noise`` (Mann-Whitney, ties averaged) and precision among the
  ``n_noise`` lowest values.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from scipy.stats import rankdata

from .errors import InputError
from .data import Interactions, Split
from .metrics import exposure_metrics, parse_metric, ranking_metrics, rating_metrics, recommendation_counts


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


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scrambles every bit."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def eligible_users(target: Interactions, users: str = "nonempty") -> np.ndarray:
    """The users a full evaluation of ``target`` averages over, ascending: those with at
    least one row (``"nonempty"``) or every user (``"all"``)."""
    if users == "all":
        return np.arange(target.n_users, dtype=np.int64)
    if users != "nonempty":
        raise ValueError(f"users must be 'nonempty' or 'all', got {users!r}")
    return np.flatnonzero(target.user_counts() > 0).astype(np.int64)


def sample_users(eligible: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The ``n`` users of ``eligible`` with the lowest seeded priority, ascending (all of
    them, in order, when ``n`` >= their number). Priorities are distinct, so the sample is
    a deterministic function of ``(seed, set of eligible users, n)``."""
    eligible = np.asarray(eligible, dtype=np.int64)
    n = int(n)
    if n >= len(eligible):
        return np.sort(eligible)
    if n <= 0:
        return np.zeros(0, np.int64)
    key = np.random.SeedSequence([int(seed), 0x5A3B1E]).generate_state(1, dtype=np.uint64)[0]
    prio = _mix64(eligible.astype(np.uint64) ^ key)
    return np.sort(eligible[np.argpartition(prio, n - 1)[:n]])


def evaluation_users(eval_cfg, target: Interactions):
    """``(users, info)`` for evaluating ``target`` under ``eval_cfg``: ``users`` is what
    :func:`~.metrics.ranking_metrics` takes (``evaluate.users``, or the seeded sample's
    indices); ``info`` is None without sampling, else ``{"sampled_users", "eligible_users",
    "seed"}``. A sample that would hold every eligible user is the full evaluation itself."""
    mode = getattr(eval_cfg, "users", "nonempty") if eval_cfg is not None else "nonempty"
    n = int(getattr(eval_cfg, "sample_users", 0) or 0) if eval_cfg is not None else 0
    if n <= 0:
        return mode, None
    eligible = eligible_users(target, mode)
    seed = int(getattr(eval_cfg, "sample_seed", 0))
    info = {"sampled_users": min(n, len(eligible)), "eligible_users": int(len(eligible)), "seed": seed}
    if n >= len(eligible):
        return mode, info
    return sample_users(eligible, n, seed), info


def sample_summary(eval_cfg, split: Split) -> Optional[dict]:
    """What ``metrics.json`` records of the sample (None without ``evaluate.sample_users``):
    the test sample's size, its eligible users and the seed, and the same counts of the
    validation sample used for early stopping."""
    _, info = evaluation_users(eval_cfg, split.test)
    if info is None:
        return None
    _, vinfo = evaluation_users(eval_cfg, split.valid)
    info["valid"] = {"sampled_users": vinfo["sampled_users"], "eligible_users": vinfo["eligible_users"]}
    return info


def sample_note(info: Optional[dict]) -> Optional[str]:
    """``"sampled: N of M users"`` when the test metrics are on a proper sample, else None."""
    if not info or info.get("sampled_users", 0) >= info.get("eligible_users", 0):
        return None
    return f"sampled: {info['sampled_users']} of {info['eligible_users']} users"


def set_context(model, parts: Sequence[Interactions]) -> None:
    """Sequential models condition their scores on the interactions before the target part
    (train for validation, train + validation for test); others ignore this."""
    if hasattr(model, "set_context"):
        model.set_context(list(parts))


def predict_ratings(model, part: Interactions, batch: int = 65536) -> np.ndarray:
    """``model.predict(users, items)`` over the rows of ``part``, batched, as numpy."""
    dev = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for s in range(0, len(part), batch):
            u = torch.as_tensor(part.user[s:s + batch], dtype=torch.long, device=dev)
            i = torch.as_tensor(part.item[s:s + batch], dtype=torch.long, device=dev)
            out.append(model.predict(u, i).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def evaluate_ranking(model, split: Split, eval_cfg, part: str = "test",
                     exclude: Optional[Sequence[Interactions]] = None,
                     context: Optional[Sequence[Interactions]] = None) -> dict:
    """Ranking metrics of ``model`` on ``split.<part>``; training (+ validation for test) excluded.

    ``context``: what context models (autoencoders, sequence models) read as the users'
    histories; by default the parts before the target (train, + valid for test). A model
    retrained on pruned data reads the kept rows (+ valid), while ``exclude`` stays the full
    training set so every variant is ranked against the same candidates.
    Rating models (``model.explicit``) on rated data also get MAE, RMSE and explained variance
    (over every row of the part; the user sample, ``evaluate.sample_users``, applies to the
    ranking metrics).
    """
    was = model.training
    model.eval()
    target, users, exclude = _evaluation_setup(model, split, eval_cfg, part, exclude, context)
    rating = {}
    if getattr(model, "explicit", False) and target.rating is not None and len(target):
        rating = rating_metrics(predict_ratings(model, target), target.rating)
    with torch.no_grad():
        out = ranking_metrics(model.score_users, target, list(exclude), metrics=list(eval_cfg.metrics),
                              ks=list(eval_cfg.ks), ndcg_variant=eval_cfg.ndcg_variant,
                              recall_variant=eval_cfg.recall_variant, users=users,
                              batch_users=eval_cfg.batch_users, device=next(model.parameters()).device)
    model.train(was)
    return {k: float(v) for k, v in out.items()} | {k: float(v) for k, v in rating.items()}


def _evaluation_setup(model, split: Split, eval_cfg, part: str, exclude, context):
    """``(target part, evaluation users, exclusions)``, the model's context set: by default
    the training set (+ validation for test) is excluded and read as the users' histories."""
    target = getattr(split, part)
    users, _ = evaluation_users(eval_cfg, target)
    before = [split.train] if part == "valid" else [split.train, split.valid]
    set_context(model, before if context is None else context)
    return target, users, before if exclude is None else exclude


def per_user_metric(model, split: Split, eval_cfg, metric: str, part: str = "test",
                    exclude: Optional[Sequence[Interactions]] = None,
                    context: Optional[Sequence[Interactions]] = None) -> np.ndarray:
    """One ranking metric per evaluation user of ``split.<part>`` (``evaluation_users``: the
    same users, in the same order, for every model on this split); exclusions and context as
    in :func:`evaluate_ranking`. Paired comparisons of two models take these arrays."""
    name, k = parse_metric(metric)
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    target, users, exclude = _evaluation_setup(model, split, eval_cfg, part, exclude, context)
    try:
        with torch.no_grad():
            out = ranking_metrics(model.score_users, target, list(exclude), metrics=[name],
                                  ks=[k] if k else [], ndcg_variant=eval_cfg.ndcg_variant,
                                  recall_variant=eval_cfg.recall_variant, users=users,
                                  batch_users=eval_cfg.batch_users, device=dev, per_user=True)
    finally:
        model.train(was)
    return np.asarray(out[metric], dtype=np.float64)


def exposure(model, split: Split, eval_cfg, popularity: np.ndarray,
             context: Optional[Sequence[Interactions]] = None) -> dict:
    """Beyond-accuracy figures of ``model``'s test top-K lists (K = the largest of
    ``evaluate.ks``; the test evaluation users, the same exclusions as the test metrics):
    :func:`~.metrics.exposure_metrics`. ``popularity``: training interactions per item."""
    k = max(eval_cfg.ks) if eval_cfg.ks else 20
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    target, users, exclude = _evaluation_setup(model, split, eval_cfg, "test", None, context)
    try:
        counts = recommendation_counts(model.score_users, target, list(exclude), k=k,
                                       users=users, batch_users=eval_cfg.batch_users, device=dev)
    finally:
        model.train(was)
    return exposure_metrics(counts, popularity, k)


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
