"""Neural Collaborative Filtering: NeuMF (He et al., WWW 2017), implicit or explicit.

Two branches over separate embedding tables, fused by one linear layer:

    GMF:  g = p_u * q_i                                   (element-wise, ``dim`` wide)
    MLP:  h_0 = [x_u ; y_i]                               (``mlp_layers[0]`` wide)
          h_l = ReLU(W_l dropout(h_{l-1}) + b_l),  l = 1..L  (widths mlp_layers[1:])
    out:  f(u, i) = w^T [g ; h_L] + b

``mlp_layers`` follows the NCF reference code: its FIRST size is the width of the
CONCATENATED MLP embeddings, so ``[16, 8, 4]`` means 8-dim MLP embeddings per side, then
layers 16 -> 8 -> 4 (RecBole's ``mlp_embedding_size 64, mlp_hidden_size [128, 64]`` is
``mlp_layers [128, 128, 64]`` here). Dropout precedes every MLP linear layer and ReLU follows
every one, the last included (RecBole's ``MLPLayers``; the NCF code has no dropout). The
dropout masks are drawn from the epoch's CPU generator (seeded, device-independent) and
apply in the training loss only; ``score_users`` and ``predict`` never drop.

``mode: implicit``: f is a logit; each training interaction (u, i) is a positive and
``num_negatives`` items u never interacted with in training are drawn uniformly
(:class:`~.mf.NegativeSampler`, exact). Pointwise binary cross-entropy,

    l(u, i) = BCE(f(u, i), 1) + mean_j BCE(f(u, j), 0)      (the per-interaction loss),

and the minimised batch loss is the mean BCE over all pointwise rows of the batch, positives
and negatives alike (NCF code, RecBole): ``sum_batch (BCE_pos + sum_j BCE_neg_j) / (B (1 + n))``.
``train.batch_size`` counts pointwise rows as in the NCF code and RecBole: a batch holds
``batch_size // (1 + n)`` positives with their negatives (batch 256 with 4 negatives: 51
positives, 255 rows; RecBole's 2048 with 1 negative: 1024 positives).

``mode: explicit``: f is the predicted rating, ``l(u, i) = (r_ui - f(u, i))^2`` and the batch
loss is its mean (``train.batch_size`` ratings a batch); the output bias starts at the mean
training rating. ``predict(u, i) = f(u, i)``; select with ``train.select_metric: rmse``.

``score_users`` evaluates the network on every (user, item) pair of a batch of users,
vectorised in chunks: the first MLP layer splits as ``W_1 [x_u; y_i] = W_1u x_u + W_1i y_i``
and the GMF term as ``(p_u * w_g) . q_i`` (a matrix product), so only the later MLP layers
run on ``B x n_items`` rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Literal, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..registry import register_model
from ..data import Interactions
from .base import Task, resolve_device
from .mf import NegativeSampler


@dataclass
class NCFConfig:
    """Options of ``model.kind: ncf`` (defaults: the deletion-diagnostics paper's NCF).

    ``dim``: GMF embedding size (predictive factors); ``mlp_layers``: MLP widths, the first one
    the CONCATENATED embedding width (even; ``[16, 8, 4]`` = 8-dim MLP embeddings per side);
    ``mode``: ``implicit`` (BCE with sampled negatives, ranking) or ``explicit`` (squared
    error on ratings); ``num_negatives``: uniform negatives per positive in implicit mode
    (null: ``train.num_negatives``); ``dropout``: before each MLP linear layer;
    ``init``: ``recbole`` (embeddings N(0, init_std^2), linear layers PyTorch's default) or
    ``ncf`` (embeddings N(0, init_std^2), MLP Xavier-uniform, output layer LeCun-uniform: the
    NCF Keras code); ``init_std``: embedding std; ``score_chunk``: at most this many
    (user, item) pairs per chunk in ``score_users``.
    """
    kind: str = "ncf"
    dim: int = 4
    mlp_layers: list[int] = field(default_factory=lambda: [16, 8, 4])
    mode: Literal["implicit", "explicit"] = "implicit"
    num_negatives: Optional[int] = 4
    dropout: float = 0.0
    init: Literal["recbole", "ncf"] = "recbole"
    init_std: float = 0.01
    score_chunk: int = 1 << 17


class NeuMF(nn.Module):
    """GMF + MLP fused by a linear layer; ``forward(users, items) -> f(u, i)`` ``[B]``."""

    def __init__(self, n_users: int, n_items: int, dim: int, mlp_layers: list[int],
                 dropout: float = 0.0, init: str = "recbole", init_std: float = 0.01,
                 score_chunk: int = 1 << 17, explicit: bool = False, out_bias: float = 0.0):
        super().__init__()
        if not mlp_layers or mlp_layers[0] <= 0 or mlp_layers[0] % 2:
            raise ValueError(f"model.mlp_layers: {mlp_layers}: the first size is the concatenated "
                             "user+item MLP embedding width and must be a positive even number")
        if any(w <= 0 for w in mlp_layers) or dim <= 0:
            raise ValueError("model.dim and model.mlp_layers must be positive")
        self.explicit = explicit
        self.score_chunk = int(score_chunk)
        half = mlp_layers[0] // 2
        self.user_gmf = nn.Embedding(n_users, dim)
        self.item_gmf = nn.Embedding(n_items, dim)
        self.user_mlp = nn.Embedding(n_users, half)
        self.item_mlp = nn.Embedding(n_items, half)
        self.mlp = nn.ModuleList(nn.Linear(a, b) for a, b in zip(mlp_layers[:-1], mlp_layers[1:]))
        self.dropout = float(dropout)
        self.out = nn.Linear(dim + mlp_layers[-1], 1)
        for e in (self.user_gmf, self.item_gmf, self.user_mlp, self.item_mlp):
            nn.init.normal_(e.weight, std=init_std)
        if init == "ncf":
            for lin in self.mlp:
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
            bound = math.sqrt(3.0 / self.out.in_features)  # LeCun uniform
            nn.init.uniform_(self.out.weight, -bound, bound)
            nn.init.zeros_(self.out.bias)
        if explicit:
            with torch.no_grad():
                self.out.bias.fill_(out_bias)

    def _head(self, g: torch.Tensor, h: torch.Tensor, masks: Optional[list] = None) -> torch.Tensor:
        """MLP layers and the fusing layer; ``masks[l]`` (inverted dropout, already scaled by
        1 / (1 - p)) multiplies layer l's input."""
        for l in range(len(self.mlp)):
            if masks is not None:
                h = h * masks[l]
            h = F.relu(self.mlp[l](h))
        return self.out(torch.cat([g, h], -1)).squeeze(-1)

    def dropout_masks(self, rows: int, generator: torch.Generator) -> Optional[list]:
        """Inverted-dropout masks ``[rows, width_l]`` for each MLP layer's input, drawn on the
        CPU from ``generator`` (so training is seeded and identical on every device); None
        without dropout."""
        if self.dropout <= 0 or not len(self.mlp):
            return None
        keep = 1.0 - self.dropout
        return [(torch.rand(rows, lin.in_features, generator=generator) < keep).float() / keep
                for lin in self.mlp]

    def forward(self, users: torch.Tensor, items: torch.Tensor, masks: Optional[list] = None) -> torch.Tensor:
        """f(u, i) ``[B]``; ``masks``: dropout masks for these rows (training), None = no dropout."""
        g = self.user_gmf(users) * self.item_gmf(items)
        h = torch.cat([self.user_mlp(users), self.item_mlp(items)], -1)
        return self._head(g, h, masks=masks)

    def predict(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """f(u, i) for aligned users and items (the rating in explicit mode)."""
        return self.forward(users, items)

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        """``[B, n_items]`` of f(u, i), in chunks of users of at most ``score_chunk`` pairs.

        With ``w = [w_g ; w_h]`` the fusing weights, ``f = (p_u * w_g) . q_i + w_h . h_L + b``:
        the GMF part is one ``[B, dim] x [dim, n_items]`` product, and the first MLP layer splits
        into a user part and an item part (no dropout when scoring), so only layers 2..L run on
        the ``B x n_items`` pairs.
        """
        n_items, dim = self.item_gmf.weight.shape
        qg, qm = self.item_gmf.weight, self.item_mlp.weight
        half = qm.shape[1]
        w_g, w_h = self.out.weight[0, :dim], self.out.weight[0, dim:]
        if len(self.mlp):
            w1, b1 = self.mlp[0].weight, self.mlp[0].bias
            item_part = qm @ w1[:, half:].T                        # [n_items, h1]
        step = max(1, self.score_chunk // max(1, n_items))
        out = [qg.new_zeros((0, n_items))]
        for s in range(0, len(users), step):
            u = users[s:s + step]
            b = len(u)
            gmf = (self.user_gmf(u) * w_g) @ qg.T                  # [b, n_items]
            pm = self.user_mlp(u)
            if len(self.mlp):
                h = F.relu((pm @ w1[:, :half].T + b1)[:, None, :] + item_part[None]).reshape(b * n_items, -1)
                for lin in self.mlp[1:]:
                    h = F.relu(lin(h))
                mlp = (h @ w_h).reshape(b, n_items)
            else:  # no hidden layer: h = [x_u ; y_i]
                mlp = (pm @ w_h[:half])[:, None] + (qm @ w_h[half:])[None, :]
            out.append(gmf + mlp + self.out.bias)
        return torch.cat(out, 0)


class NCFTask(Task):
    """Pointwise training of :class:`NeuMF`: BCE with sampled negatives, or squared error."""

    def __init__(self, model: NeuMF, train: Interactions, batch_size: int, num_negatives: int,
                 explicit: bool):
        self.model = model
        self.explicit = explicit
        self.n_train = len(train)
        self.num_negatives = int(num_negatives)
        dev = self.device
        self.users = torch.as_tensor(train.user, dtype=torch.long, device=dev)
        self.items = torch.as_tensor(train.item, dtype=torch.long, device=dev)
        if explicit:
            self.ratings = torch.as_tensor(train.rating, dtype=torch.float32, device=dev)
            self.per_batch = max(1, int(batch_size))
        else:
            if self.num_negatives < 1:
                raise ValueError("model.num_negatives must be >= 1 in implicit mode")
            self.negatives = NegativeSampler(train, dev)
            self.per_batch = max(1, int(batch_size) // (1 + self.num_negatives))

    def batches(self, epoch: int, generator: torch.Generator) -> Iterator[dict]:
        dev = self.device
        perm = self.visit_order(generator)
        for start in range(0, len(perm), self.per_batch):
            idx = perm[start:start + self.per_batch].long()
            batch = {"idx": idx, "user": self.users[idx], "item": self.items[idx]}
            if self.explicit:
                batch["rating"] = self.ratings[idx]
                rows = len(idx)
            else:
                batch["neg"] = self.negatives.sample(batch["user"], self.num_negatives, generator)
                rows = len(idx) * (1 + self.num_negatives)
            masks = self.model.dropout_masks(rows, generator)
            if masks is not None:
                batch["masks"] = [m.to(dev) for m in masks]
            yield batch

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.explicit:
            err = (self.module(batch["user"], batch["item"], batch.get("masks")) - batch["rating"]).pow(2)
            return err.mean(), err.detach()
        u, pos, neg = batch["user"], batch["item"], batch["neg"]
        n = neg.shape[1]
        users = torch.cat([u, u.repeat_interleave(n)])
        items = torch.cat([pos, neg.reshape(-1)])
        logits = self.module(users, items, batch.get("masks"))  # rows: positives, then negatives
        b = len(u)
        # BCE(f, 1) = softplus(-f), BCE(f, 0) = softplus(f): stable, one elementwise op each
        l_pos = F.softplus(-logits[:b])
        l_neg = F.softplus(logits[b:]).reshape(b, n)
        scalar = (l_pos.sum() + l_neg.sum()) / (b * (1 + n))
        return scalar, (l_pos + l_neg.mean(1)).detach()


def _require_ratings(train: Interactions, kind: str) -> None:
    if train.rating is None or not np.isfinite(train.rating).all():
        raise ValueError(f"model.kind {kind} in explicit mode needs a rating on every training "
                         "interaction (set data.columns.rating; keep data.implicit: all)")


@register_model("ncf", NCFConfig, reads=("rating",))
def build_ncf(opts: NCFConfig, train: Interactions, train_cfg, device: str = "auto") -> NCFTask:
    dev = resolve_device(device)
    explicit = opts.mode == "explicit"
    mean = 0.0
    if explicit:
        _require_ratings(train, "ncf")
        mean = float(np.mean(train.rating)) if len(train) else 0.0
    model = NeuMF(train.n_users, train.n_items, opts.dim, list(opts.mlp_layers), opts.dropout,
                  opts.init, opts.init_std, opts.score_chunk, explicit=explicit, out_bias=mean).to(dev)
    n_neg = opts.num_negatives if opts.num_negatives is not None else train_cfg.num_negatives
    return NCFTask(model, train, train_cfg.batch_size, n_neg, explicit)
