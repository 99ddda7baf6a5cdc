"""SVD recommenders in two forms: PureSVD (ranking, closed form) and biased MF (ratings, SGD).

``model.kind: puresvd`` -- PureSVD (Cremonesi, Koren & Turrin, RecSys 2010). With R the binary
user x item matrix of the training interactions and its rank-k truncated SVD
``R ~ U_k S_k V_k^T``,

    score(u, :) = r_u V_k V_k^T = (U_k S_k)_u V_k^T,

i.e. user factors ``P = U_k S_k`` and item factors ``Q = V_k`` (both stored as frozen
parameters). Computed by ``scipy.sparse.linalg.svds`` (ARPACK) with a starting vector drawn
from ``train.seed``, so the fit is deterministic; dense LAPACK SVD when k >= min(shape) - 1.
No epochs: the task is ``closed_form``. A training interaction's loss (for loss-based
valuers) is its squared reconstruction error ``(1 - P_u . Q_i)^2``.

``model.kind: svd`` -- the biased matrix factorisation of Funk / Koren ("SVD" of the Surprise
library) for rating prediction:

    r_hat(u, i) = mu + b_u + b_i + p_u . q_i,        mu = mean training rating (fixed),
    loss(u, i)  = (r_ui - r_hat)^2 + reg (b_u^2 + b_i^2 + |p_u|^2 + |q_i|^2),

biases start at 0, factors at N(init_mean, init_std^2). Surprise updates one rating at a time,
``b_u += lr (e - reg b_u)``, ``p_u += lr (e q_i - reg p_u)``, ..., which is one SGD step of
``loss / 2``. Here a minibatch minimises ``sum_batch loss / 2`` (a SUM, not a mean) with
``train.optimizer: sgd``: a parameter that occurs once in the batch gets exactly Surprise's
step (computed from the batch-start values), one that occurs m times gets the sum of its m
steps. With batch 128 on ML-100K a user occurs ~0.1 times per batch on average and the most
popular item ~0.8 times, so this is a close approximation of Surprise's per-rating SGD (the
order of ratings is reshuffled every epoch; Surprise goes through them in a fixed order).
``predict`` clips to the training rating range as Surprise's ``predict`` does; ``score_users``
(ranking) is unclipped. The per-interaction loss is the squared error ``(r_ui - r_hat)^2``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import svds
from torch import nn

from ..registry import register_model
from ..data import Interactions
from .base import Task, resolve_device


# ---------------------------------------------------------------------------------------
# PureSVD
# ---------------------------------------------------------------------------------------
@dataclass
class PureSVDConfig:
    """Options of ``model.kind: puresvd``.

    ``rank``: number k of singular triplets kept (capped at min(n_users, n_items)); 50 is the
    MovieLens setting of Cremonesi et al.; choose it on validation data (``jobs/ml100k_svd.yaml``
    documents the sweep). ``tol``: ARPACK's relative accuracy (0 = machine precision).
    """
    kind: str = "puresvd"
    rank: int = 50
    tol: float = 0.0


def truncated_svd(R: sp.spmatrix, k: int, seed: int, tol: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` singular triplets ``(U [m, k], s [k] descending, V [n, k])`` of ``R``.

    ARPACK (``svds``) with the starting vector ``v0 ~ U(-1, 1)^{min(m, n)}`` from ``seed``
    (deterministic); dense LAPACK when ``k >= min(m, n) - 1`` (ARPACK needs ``k < min(m, n)``).
    Each singular vector's sign is fixed so that its largest-magnitude entry of ``V`` is positive.
    """
    m, n = R.shape
    k = int(min(k, m, n))
    if k <= 0:
        return np.zeros((m, 0)), np.zeros(0), np.zeros((n, 0))
    if k >= min(m, n) - 1:
        U, s, Vt = np.linalg.svd(R.toarray().astype(np.float64), full_matrices=False)
        U, s, V = U[:, :k], s[:k], Vt[:k].T
    else:
        v0 = np.random.default_rng(seed).uniform(-1.0, 1.0, min(m, n))
        U, s, Vt = svds(R.astype(np.float64), k=k, v0=v0, tol=tol, solver="arpack")
        order = np.argsort(-s, kind="stable")
        U, s, V = U[:, order], s[order], Vt[order].T
    flip = np.sign(V[np.abs(V).argmax(0), np.arange(k)])
    flip[flip == 0] = 1.0
    return U * flip, s, V * flip


class PureSVD(nn.Module):
    """Frozen factors ``P = U_k S_k`` [n_users, k] and ``Q = V_k`` [n_items, k]."""

    def __init__(self, n_users: int, n_items: int, rank: int):
        super().__init__()
        k = int(max(0, min(rank, n_users, n_items)))
        self.P = nn.Parameter(torch.zeros(n_users, k), requires_grad=False)
        self.Q = nn.Parameter(torch.zeros(n_items, k), requires_grad=False)
        self.register_buffer("singular_values", torch.zeros(k))

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        return self.P[users] @ self.Q.T

    def predict(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Reconstructed entries ``R_hat[u, i]`` for aligned users and items."""
        return (self.P[users] * self.Q[items]).sum(-1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.predict(users, items)


class PureSVDTask(Task):
    closed_form = True

    def __init__(self, model: PureSVD, train: Interactions, seed: int, tol: float = 0.0):
        self.model = model
        self.n_train = len(train)
        self.train = train
        self.seed = int(seed)
        self.tol = float(tol)

    def fit_closed_form(self, drop_rows=None) -> None:
        train = self.train if drop_rows is None else self.train.take(~drop_rows.cpu().numpy())
        R = train.csr()
        R.data[:] = 1.0  # binary: duplicated pairs count once
        U, s, V = truncated_svd(R, self.model.P.shape[1], self.seed, self.tol)
        with torch.no_grad():
            dev = self.device
            self.model.P.copy_(torch.as_tensor(U * s, dtype=torch.float32, device=dev))
            self.model.Q.copy_(torch.as_tensor(V, dtype=torch.float32, device=dev))
            self.model.singular_values.copy_(torch.as_tensor(s, dtype=torch.float32, device=dev))

    def interaction_losses(self, batch: int = 65536) -> np.ndarray:
        """``(1 - R_hat[u, i])^2`` of every training row (for loss-based valuers)."""
        dev = self.device
        out = []
        with torch.no_grad():
            for s in range(0, self.n_train, batch):
                u = torch.as_tensor(self.train.user[s:s + batch], dtype=torch.long, device=dev)
                i = torch.as_tensor(self.train.item[s:s + batch], dtype=torch.long, device=dev)
                out.append((1.0 - self.model.predict(u, i)).pow(2).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def batches(self, epoch: int, generator: torch.Generator) -> Iterator[dict]:
        raise RuntimeError("PureSVD is fit in closed form (fit_closed_form), not by batches")


@register_model("puresvd", PureSVDConfig, reads=())
def build_puresvd(opts: PureSVDConfig, train: Interactions, train_cfg, device: str = "auto") -> PureSVDTask:
    if opts.rank <= 0:
        raise ValueError(f"model.rank: {opts.rank} must be positive")
    dev = resolve_device(device)
    model = PureSVD(train.n_users, train.n_items, opts.rank).to(dev)
    return PureSVDTask(model, train, train_cfg.seed, opts.tol)


# ---------------------------------------------------------------------------------------
# biased MF for ratings (Surprise's SVD)
# ---------------------------------------------------------------------------------------
@dataclass
class SVDConfig:
    """Options of ``model.kind: svd`` (defaults: Surprise's ``SVD``).

    ``n_factors``: size of p_u, q_i; ``reg``: L2 weight on b_u, b_i, p_u, q_i of each rating
    (Surprise's ``reg_all``); ``init_mean``, ``init_std``: normal initialisation of the factors
    (biases start at 0); ``biased``: use mu + b_u + b_i (false: r_hat = p_u . q_i, Surprise's
    ``biased=False``); ``clip``: clip ``predict`` to the training rating range. The learning
    rate (Surprise's ``lr_all`` 0.005), epochs (20) and batch size are ``train.*``; use
    ``train.optimizer: sgd`` and ``train.weight_decay: 0``.
    """
    kind: str = "svd"
    n_factors: int = 100
    reg: float = 0.02
    init_mean: float = 0.0
    init_std: float = 0.1
    biased: bool = True
    clip: bool = True


class BiasedMF(nn.Module):
    """``r_hat = mu + b_u + b_i + p_u . q_i``; ``forward`` returns ``(r_hat, penalty)`` with
    ``penalty = b_u^2 + b_i^2 + |p_u|^2 + |q_i|^2`` per pair."""

    explicit = True

    def __init__(self, n_users: int, n_items: int, n_factors: int, mu: float, r_min: float,
                 r_max: float, init_mean: float = 0.0, init_std: float = 0.1,
                 biased: bool = True, clip: bool = True):
        super().__init__()
        self.user_emb = nn.Embedding(n_users, n_factors)
        self.item_emb = nn.Embedding(n_items, n_factors)
        self.user_bias = nn.Embedding(n_users, 1)
        self.item_bias = nn.Embedding(n_items, 1)
        nn.init.normal_(self.user_emb.weight, mean=init_mean, std=init_std)
        nn.init.normal_(self.item_emb.weight, mean=init_mean, std=init_std)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)
        self.biased = biased
        self.clip = clip
        if not biased:
            self.user_bias.weight.requires_grad_(False)
            self.item_bias.weight.requires_grad_(False)
        self.register_buffer("mu", torch.tensor(float(mu) if biased else 0.0))
        self.register_buffer("r_range", torch.tensor([float(r_min), float(r_max)]))

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pu, qi = self.user_emb(users), self.item_emb(items)
        bu, bi = self.user_bias(users).squeeze(-1), self.item_bias(items).squeeze(-1)
        r_hat = self.mu + bu + bi + (pu * qi).sum(-1)
        penalty = pu.pow(2).sum(-1) + qi.pow(2).sum(-1)
        if self.biased:
            penalty = penalty + bu.pow(2) + bi.pow(2)
        return r_hat, penalty

    def predict(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        r_hat = self.forward(users, items)[0]
        return r_hat.clamp(self.r_range[0], self.r_range[1]) if self.clip else r_hat

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        """Unclipped predicted ratings of every item, ``[B, n_items]``."""
        return (self.mu + self.user_bias(users) + self.item_bias.weight.T
                + self.user_emb(users) @ self.item_emb.weight.T)


class SVDTask(Task):
    """Minibatch SGD on ``sum_batch [(r - r_hat)^2 + reg * penalty] / 2`` (see the module doc)."""

    explicit = True

    def __init__(self, model: BiasedMF, train: Interactions, batch_size: int, reg: float):
        self.model = model
        self.n_train = len(train)
        self.batch_size = max(1, int(batch_size))
        self.reg = float(reg)
        dev = self.device
        self.users = torch.as_tensor(train.user, dtype=torch.long, device=dev)
        self.items = torch.as_tensor(train.item, dtype=torch.long, device=dev)
        self.ratings = torch.as_tensor(train.rating, dtype=torch.float32, device=dev)

    def batches(self, epoch: int, generator: torch.Generator) -> Iterator[dict]:
        perm = self.visit_order(generator)
        for start in range(0, len(perm), self.batch_size):
            idx = perm[start:start + self.batch_size].long()
            yield {"idx": idx, "user": self.users[idx], "item": self.items[idx], "rating": self.ratings[idx]}

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        r_hat, penalty = self.module(batch["user"], batch["item"])
        sq = (batch["rating"] - r_hat).pow(2)
        return 0.5 * (sq + self.reg * penalty).sum(), sq.detach()


@register_model("svd", SVDConfig, reads=("rating",))
def build_svd(opts: SVDConfig, train: Interactions, train_cfg, device: str = "auto") -> SVDTask:
    if train.rating is None or not np.isfinite(train.rating).all():
        raise ValueError("model.kind svd needs a rating on every training interaction "
                         "(set data.columns.rating; keep data.implicit: all)")
    dev = resolve_device(device)
    r = np.asarray(train.rating, dtype=np.float64)
    mu = float(r.mean()) if len(r) else 0.0
    lo, hi = (float(r.min()), float(r.max())) if len(r) else (0.0, 0.0)
    model = BiasedMF(train.n_users, train.n_items, opts.n_factors, mu, lo, hi, opts.init_mean,
                     opts.init_std, opts.biased, opts.clip).to(dev)
    return SVDTask(model, train, train_cfg.batch_size, opts.reg)
