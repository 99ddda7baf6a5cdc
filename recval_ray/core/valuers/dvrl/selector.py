"""DVRL maths (Yoon, Arik & Pfister, "Data Valuation using Reinforcement Learning", ICML 2020).

A selector ``h_phi(x_i) = p_i`` gives each training interaction a keep probability. One outer
iteration draws K selections ``s_k ~ Bernoulli(p)``, trains the recommender on each, and scores
it on validation: reward ``r_k = m(s_k) - m(full)``. The selector minimises (REINFORCE with a
moving-average baseline ``b``)

    L(phi) = -(1/K) sum_k (r_k - b) log pi_phi(s_k) + penalty(p),
    log pi_phi(s) = sum_i s_i log p_i + (1 - s_i) log(1 - p_i),

whose gradient is the REINFORCE estimate ``-(1/K) sum_k (r_k - b) grad log pi(s_k)`` of
``-grad E_s[r(s)]``; ``b``, built from earlier iterations, does not bias it
(``E_s[grad log pi(s)] = 0``; the first iteration uses its own mean reward, a small bias at that one
step). The log-likelihood is
summed over the interactions, as in DVRL's reference code; it is computed from the logits
(``-BCEWithLogits``), the exact form of the code's ``log(p + 1e-8)``.

Exploration penalty (the reference code's ``dve_loss``, threshold ``C = 0.9``, weight ``1e3``)::

    penalty(p) = beta * (max(mean(p) - hi, 0) + max(lo - mean(p), 0)),   hi = C, lo = 1 - C,

which keeps the mean keep probability in ``[lo, hi]`` so selections stay random (exploration).
The paper's baseline is the moving average ``b <- (1 - 1/T) b + r / T`` of past rewards (the code
subtracts only the full-data performance, i.e. ``m(full)`` here).

The inner models (:func:`train_selected_mf`): K BPR-MF models stacked as ``[n, K, d]`` tables,
trained at once on one batch stream of the whole training set where model k averages its loss
over the batch's examples it selected. With dense Adam (the optimiser of the base trainer) that
is exactly K separate models, each trained with torch's Adam on that masked batch stream.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ...data import Interactions
from ...train import epoch_generator, make_optimizer


# ---------------------------------------------------------------------------------------
# selector inputs and network
# ---------------------------------------------------------------------------------------
def recency_rank(user: np.ndarray, timestamp: np.ndarray, n_users: int) -> np.ndarray:
    """Rank of each row's timestamp within its user, scaled to [0, 1] (0 oldest, 1 newest;
    ties broken by row order; a single-row user gets 0)."""
    order = np.lexsort((np.arange(len(user)), timestamp, user))
    counts = np.bincount(user, minlength=n_users)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(user), dtype=np.float64)
    rank[order] = np.arange(len(user)) - start[user[order]]
    return rank / np.maximum(counts[user] - 1, 1)


def standardise_columns(x: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` per column; a constant column becomes 0 (a spread below rounding,
    ``std <= 1e-12 * max(1, |mean|)``, counts as constant: dividing rounding noise by itself
    would turn a constant column into +-1)."""
    x = np.asarray(x, dtype=np.float64)
    mean, sd = x.mean(0), x.std(0)
    constant = sd <= 1e-12 * np.maximum(1.0, np.abs(mean))
    return np.where(constant, 0.0, (x - mean) / np.where(constant, 1.0, sd))


def interaction_features(train: Interactions, loss: np.ndarray,
                         user_emb: Optional[np.ndarray] = None,
                         item_emb: Optional[np.ndarray] = None) -> tuple[np.ndarray, list, dict]:
    """Standardised selector inputs ``[n_train, F]``, their names and what was left out.

    Columns: base-model user and item embeddings (if given), the training loss, the item's
    log(1 + train count), the rating and the within-user timestamp rank. Rating and recency
    are used only when *every* row has them (finite rating, timestamp >= 0): injected noise
    rows have none (NaN / -1), so a partially present column would flag them by its
    missingness, an artefact of the simulation rather than a property of the data."""
    cols, names, omitted = [], [], {}
    if user_emb is not None and item_emb is not None:
        cols += [np.asarray(user_emb)[train.user], np.asarray(item_emb)[train.item]]
        names += [f"user_emb_{j}" for j in range(user_emb.shape[1])]
        names += [f"item_emb_{j}" for j in range(item_emb.shape[1])]
    else:
        omitted["embeddings"] = "the base model has no user/item embedding tables"
    cols.append(np.asarray(loss, dtype=np.float64)[:, None])
    names.append("train_loss")
    cols.append(np.log1p(train.item_counts()[train.item]).astype(np.float64)[:, None])
    names.append("log_item_count")
    if train.rating is not None and np.isfinite(train.rating).all():
        cols.append(np.asarray(train.rating, dtype=np.float64)[:, None])
        names.append("rating")
    else:
        omitted["rating"] = "absent" if train.rating is None else "missing on some rows"
    if train.timestamp is not None and (np.asarray(train.timestamp) >= 0).all():
        cols.append(recency_rank(train.user, np.asarray(train.timestamp), train.n_users)[:, None])
        names.append("recency")
    else:
        omitted["recency"] = "absent" if train.timestamp is None else "missing on some rows"
    x = standardise_columns(np.concatenate(cols, 1))
    return x.astype(np.float32), names, omitted


class Selector(nn.Module):
    """The data value estimator: an MLP ``x -> logit``; ``p = sigmoid(logit)``."""

    def __init__(self, n_in: int, hidden: Sequence[int] = (64, 32)):
        super().__init__()
        layers, d = [], n_in
        for h in hidden:
            layers += [nn.Linear(d, int(h)), nn.ReLU()]
            d = int(h)
        layers.append(nn.Linear(d, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


# ---------------------------------------------------------------------------------------
# REINFORCE objective
# ---------------------------------------------------------------------------------------
def selection_log_prob(logits: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``log pi(s) = sum_i s_i log p_i + (1 - s_i) log(1 - p_i)`` with ``p = sigmoid(logits)``;
    ``s`` ``[K, N]`` -> ``[K]``."""
    return -F.binary_cross_entropy_with_logits(logits.expand_as(s), s.to(logits.dtype),
                                               reduction="none").sum(-1)


def exploration_penalty(p: torch.Tensor, lo: float, hi: float, weight: float) -> torch.Tensor:
    """``weight * (max(mean p - hi, 0) + max(lo - mean p, 0))``."""
    m = p.mean()
    return weight * (torch.clamp(m - hi, min=0) + torch.clamp(lo - m, min=0))


def reinforce_loss(logits: torch.Tensor, s: torch.Tensor, advantage: torch.Tensor,
                   lo: float, hi: float, weight: float) -> torch.Tensor:
    """``-(1/K) sum_k A_k log pi(s_k) + penalty(sigmoid(logits))``, ``A_k = r_k - b``."""
    adv = torch.as_tensor(advantage, dtype=logits.dtype)
    return -(adv * selection_log_prob(logits, s)).mean() + \
        exploration_penalty(torch.sigmoid(logits), lo, hi, weight)


class MovingBaseline:
    """``b <- (1 - 1/T) b + mean_k(r_k) / T`` after each iteration; the first iteration's mean
    reward initialises it (so the first update compares the K selections with each other)."""

    def __init__(self, window: int):
        self.decay = 1.0 - 1.0 / max(1, int(window))
        self.value: Optional[float] = None

    def advantage(self, rewards: np.ndarray) -> np.ndarray:
        b = float(np.mean(rewards)) if self.value is None else self.value
        return np.asarray(rewards, dtype=np.float64) - b

    def update(self, rewards: np.ndarray) -> float:
        r = float(np.mean(rewards))
        self.value = r if self.value is None else self.decay * self.value + (1 - self.decay) * r
        return self.value


# ---------------------------------------------------------------------------------------
# K BPR-MF models on K selections at once
# ---------------------------------------------------------------------------------------
def stacked_bpr_terms(U: torch.Tensor, I: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example per-model BPR losses and L2 terms ``[B, K]`` of a batch for stacked tables
    ``U [n_u, K, d]``, ``I [n_i, K, d]`` (a row of every model is one contiguous block, so a
    lookup and its gradient are plain row copies): ``softplus(s_uj - s_ui)`` (mean over the
    negatives) and ``(|p_u|^2 + |q_i|^2 + mean_j |q_j|^2) / 2``, as :class:`....models.mf.MF`."""
    users, pos, neg = batch["user"], batch["pos"], batch["neg"]
    pu = U.index_select(0, users)                                      # [B, K, d]
    qi = I.index_select(0, pos)
    qj = I.index_select(0, neg.reshape(-1)).view(*neg.shape, *I.shape[1:])   # [B, n, K, d]
    s_pos = (pu * qi).sum(-1)                                          # [B, K]
    s_neg = (pu.unsqueeze(1) * qj).sum(-1)                             # [B, n, K]
    per = F.softplus(s_neg - s_pos.unsqueeze(1)).mean(1)
    l2 = 0.5 * (pu.pow(2).sum(-1) + qi.pow(2).sum(-1) + qj.pow(2).sum(-1).mean(1))
    return per, l2


def train_selected_mf(task, masks: torch.Tensor, user_init: torch.Tensor, item_init: torch.Tensor,
                      train_cfg, epochs: int, seed: int, reg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Train ``K = len(masks)`` BPR-MF models at once; model k on the rows where ``masks[k]``.

    All models start from ``(user_init, item_init)`` and see the batches of ``task`` (a plain
    BPR task over the whole training set) drawn from ``epoch_generator(seed, epoch)``; model k's
    batch loss is ``sum_b w_bk (l_bk + reg l2_bk) / sum_b w_bk`` with ``w_bk`` its selection of
    the batch's rows. Optimiser: ``train_cfg``'s (dense Adam / AdamW / SGD, elementwise, so the
    stack equals K separate models). Returns the tables of model k as ``U[:, k]``, ``I[:, k]``
    (``[n_u, K, d]``, ``[n_i, K, d]``)."""
    K = int(masks.shape[0])
    U = user_init.detach().unsqueeze(1).repeat(1, K, 1).requires_grad_(True)
    I = item_init.detach().unsqueeze(1).repeat(1, K, 1).requires_grad_(True)
    opt = make_optimizer([U, I], train_cfg)
    w_all = masks.T.to(U.dtype).contiguous()                           # [N, K]
    for epoch in range(int(epochs)):
        for batch in task.batches(epoch, epoch_generator(seed, epoch)):
            w = w_all.index_select(0, batch["idx"])                    # [B, K]
            per, l2 = stacked_bpr_terms(U, I, batch)
            loss = ((w * (per + reg * l2)).sum(0) / w.sum(0).clamp_min(1.0)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return U.detach(), I.detach()
