"""Matrix factorisation trained with the BPR loss (Rendle et al. 2009).

score(u, i) = p_u . q_i.  For a training interaction (u, i) and a sampled negative j
that u never interacted with in training,

    l_BPR(u, i, j) = softplus(s_uj - s_ui) = -log sigmoid(s_ui - s_uj),

plus ``reg`` * (||p_u||^2 + ||q_i||^2 + ||q_j||^2) / 2 on the batch's embeddings (the
LightGCN / PLD convention). With ``num_negatives`` > 1 an interaction's loss is the mean
over its negatives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np
import torch
from torch import nn

from ...registry import register_model
from ..data import Interactions
from .base import Task, resolve_device


@dataclass
class MFConfig:
    kind: str = "mf"
    dim: int = 64
    reg: float = 1e-4
    init: Literal["normal", "xavier"] = "normal"
    init_std: float = 0.1
    sampler: Literal["interactions", "users"] = "interactions"


def init_embeddings(init: str, std: float, *embeddings: nn.Embedding) -> None:
    """``normal``: N(0, std^2) (LightGCN / PLD code); ``xavier``: Xavier-normal, std =
    sqrt(2 / (rows + dim)) per table (RecBole)."""
    for e in embeddings:
        if init == "xavier":
            nn.init.xavier_normal_(e.weight)
        else:
            nn.init.normal_(e.weight, std=std)


class MF(nn.Module):
    def __init__(self, n_users: int, n_items: int, dim: int, init_std: float = 0.1, init: str = "normal"):
        super().__init__()
        self.user_emb = nn.Embedding(n_users, dim)
        self.item_emb = nn.Embedding(n_items, dim)
        init_embeddings(init, init_std, self.user_emb, self.item_emb)

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        return self.user_emb(users) @ self.item_emb.weight.T

    def forward(self, users, pos, neg):
        return self.bpr_terms(users, pos, neg)

    def bpr_terms(self, users, pos, neg):
        """``(s_pos [B], s_neg [B, n], l2 [B])`` for users, positives and negatives [B, n]."""
        pu, qi, qj = self.user_emb(users), self.item_emb(pos), self.item_emb(neg)
        s_pos = (pu * qi).sum(-1)
        s_neg = torch.einsum("bd,bnd->bn", pu, qj)
        l2 = 0.5 * (pu.pow(2).sum(-1) + qi.pow(2).sum(-1) + qj.pow(2).sum(-1).mean(-1))
        return s_pos, s_neg, l2


class NegativeSampler:
    """Exact uniform negatives: items the user has no training interaction with.

    With the user's positives sorted, p_0 < p_1 < ..., the r-th non-positive item is
    ``r + #{j : p_j - j <= r}``. Drawing r uniformly in ``[0, n_items - |P_u|)`` and mapping it
    with one ``searchsorted`` over the keys ``u * n_items + (p_j - j)`` gives an exact draw from
    the complement: no rejection loop, a fixed number of random numbers per call. A user who
    interacted with every item gets uniform items (there is no negative to give).
    """

    def __init__(self, train: Interactions, device: torch.device):
        keys = np.unique(train.pair_keys())
        users, items = keys // train.n_items, keys % train.n_items
        counts = np.bincount(users, minlength=train.n_users)
        start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.arange(len(keys)) - start[users]
        self.n_items = train.n_items
        self.qkeys = torch.as_tensor(users * train.n_items + (items - rank), device=device)
        self.start = torch.as_tensor(start, device=device)
        self.free = torch.as_tensor(train.n_items - counts, device=device)

    def sample(self, users: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        u = users[:, None].expand(-1, n)
        rand = torch.rand(u.shape, generator=generator, dtype=torch.float64).to(users.device)
        free = self.free[u]
        r = torch.minimum((rand * free.clamp_min(1)).long(), (free - 1).clamp_min(0))
        before = torch.searchsorted(self.qkeys, u * self.n_items + r, right=True) - self.start[u]
        neg = r + before
        return torch.where(free > 0, neg, (rand * self.n_items).long())


class BPRTask(Task):
    """BPR training over the training interactions of any model with ``bpr_terms``.

    ``sampler="interactions"``: every epoch visits each training interaction once in a
    seeded random order (RecBole). ``sampler="users"``: each batch slot draws a user
    uniformly, then one of the user's positives (LightGCN / PLD code); an epoch has
    ``n_train / batch_size`` batches (sampling with replacement: a data-parallel rank draws
    its own users and ignores :meth:`restrict`).
    """

    def __init__(self, model: nn.Module, train: Interactions, batch_size: int, reg: float,
                 num_negatives: int = 1, sampler: str = "interactions"):
        self.model = model
        self.n_train = len(train)
        self.batch_size = batch_size
        self.reg = reg
        self.num_negatives = num_negatives
        self.sampler_kind = sampler
        dev = self.device
        self.users = torch.as_tensor(train.user, device=dev)
        self.items = torch.as_tensor(train.item, device=dev)
        self.negatives = NegativeSampler(train, dev)
        if sampler == "users":
            order = np.lexsort((train.item, train.user))
            counts = train.user_counts()
            self.by_user = torch.as_tensor(order, device=dev)
            self.user_start = torch.as_tensor(np.concatenate([[0], np.cumsum(counts)[:-1]]), device=dev)
            self.user_count = torch.as_tensor(counts, device=dev)
            self.active_users = torch.as_tensor(np.flatnonzero(counts > 0), device=dev)

    def batches(self, epoch: int, generator: torch.Generator) -> Iterator[dict]:
        dev = self.device
        if self.sampler_kind == "users":
            n_batches = max(1, -(-self.n_train // self.batch_size))
            for _ in range(n_batches):
                pick = torch.randint(len(self.active_users), (self.batch_size,), generator=generator).to(dev)
                u = self.active_users[pick]
                off = (torch.rand(self.batch_size, generator=generator).to(dev) * self.user_count[u]).long()
                idx = self.by_user[self.user_start[u] + off]
                yield self._batch(idx, generator)
        else:
            perm = self.visit_order(generator)
            for start in range(0, len(perm), self.batch_size):
                yield self._batch(perm[start:start + self.batch_size], generator)

    def _batch(self, idx: torch.Tensor, generator: torch.Generator) -> dict:
        users = self.users[idx]
        return {"idx": idx, "user": users, "pos": self.items[idx],
                "neg": self.negatives.sample(users, self.num_negatives, generator)}

    def example_losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        s_pos, s_neg, l2 = self.module(batch["user"], batch["pos"], batch["neg"])
        return nn.functional.softplus(s_neg - s_pos[:, None]).mean(-1), l2

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        per, l2 = self.example_losses(batch)
        return per.mean() + self.reg * l2.mean(), per.detach()


@register_model("mf", MFConfig)
def build_mf(opts: MFConfig, train: Interactions, train_cfg, device: str = "auto") -> BPRTask:
    dev = resolve_device(device)
    model = MF(train.n_users, train.n_items, opts.dim, opts.init_std, opts.init).to(dev)
    return BPRTask(model, train, train_cfg.batch_size, opts.reg, train_cfg.num_negatives, opts.sampler)
