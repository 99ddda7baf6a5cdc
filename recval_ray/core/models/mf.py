"""Matrix factorisation trained with the BPR loss (Rendle et al. 2009).

score(u, i) = p_u . q_i.  For a training interaction (u, i) and a sampled negative j
that u never interacted with in training,

    l_BPR(u, i, j) = softplus(s_uj - s_ui) = -log sigmoid(s_ui - s_uj),

plus ``reg`` * (||p_u||^2 + ||q_i||^2 + ||q_j||^2) / 2 on the batch's embeddings (the
LightGCN / PLD convention). With ``num_negatives`` > 1 an interaction's loss is the mean
over its negatives.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Literal, Optional

import numpy as np
import torch
from torch import nn

from ..registry import register_model
from ..data import Interactions
from ..denoise import (DenoiseConfig, pld_choice, pld_pool_offsets, rce_weights, tce_drop_rate,
                       tce_keep_count, tce_keep_mask)
from .base import Task, resolve_device

log = logging.getLogger("recval_ray.train")


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


def choose_positive(eu: torch.Tensor, ei: torch.Tensor, users: torch.Tensor, pool: torch.Tensor,
                    neg: torch.Tensor, choose) -> torch.Tensor:
    """One positive per user from a pool (PLD): ``choose(s_pool [B, k], s_neg [B, n]) -> col [B]``
    sees the scores ``e_u . e_i`` of the pool ``[B, k]`` and of the negatives ``[B, n]``,
    computed without autograd from the user / item embeddings ``eu``, ``ei`` (final ones:
    LightGCN's propagated tables); returns the chosen items ``[B]``."""
    with torch.no_grad():
        # one [B, d] block per pool / negative column: no [B, k, d] temporaries (on the CPU,
        # fresh multi-MB buffers cost page faults on every batch); index_select and mul-sum
        # are several times faster than advanced indexing and bmm there
        pu = eu.index_select(0, users)
        cols = torch.cat([pool, neg], 1).T.contiguous()
        s = torch.stack([(pu * ei.index_select(0, c)).sum(-1) for c in cols], 1)
        k = pool.shape[1]
        col = choose(s[:, :k], s[:, k:])
    return pool.gather(1, col[:, None]).squeeze(1)


class MF(nn.Module):
    def __init__(self, n_users: int, n_items: int, dim: int, init_std: float = 0.1, init: str = "normal"):
        super().__init__()
        self.user_emb = nn.Embedding(n_users, dim)
        self.item_emb = nn.Embedding(n_items, dim)
        init_embeddings(init, init_std, self.user_emb, self.item_emb)

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        return self.user_emb(users) @ self.item_emb.weight.T

    def forward(self, users, pos, neg, choose=None):
        return self.bpr_terms(users, pos, neg, choose)

    def bpr_terms(self, users, pos, neg, choose=None):
        """``(s_pos [B], s_neg [B, n], l2 [B])`` for users, positives and negatives [B, n].
        With ``choose``, ``pos`` is a pool ``[B, k]`` and the terms are those of the positive
        :func:`choose_positive` picks per row."""
        if choose is not None:
            pos = choose_positive(self.user_emb.weight, self.item_emb.weight, users, pos, neg, choose)
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

    CHUNK = 1 << 20     # keys transformed at once (bounded temporaries)

    def padding(self, train: Interactions) -> tuple[int, int]:
        """Free slots before and after the keys in their buffer (:attr:`keys_buffer`), for a
        subclass that needs sentinels around them without a second copy."""
        return 0, 0

    def __init__(self, train: Interactions, device: torch.device):
        front, back = self.padding(train)
        n = len(train)
        buf = np.empty(front + n + back, dtype=np.int64)
        keys = buf[front:front + n]               # user * n_items + item, sorted in place
        np.multiply(train.user, np.int64(train.n_items), out=keys)
        keys += train.item
        keys.sort()
        if n > 1 and (keys[1:] == keys[:-1]).any():
            unique = keys[np.r_[True, keys[1:] != keys[:-1]]]
            keys = buf[front:front + len(unique)]
            keys[:] = unique
            del unique
        n_items = np.int64(train.n_items)
        # user u's keys lie in [u * n_items, (u + 1) * n_items): its first position and count
        start = np.searchsorted(keys, np.arange(train.n_users, dtype=np.int64) * n_items, side="left")
        counts = np.diff(np.append(start, len(keys)))
        # q = u * n_items + (i - rank) = key - rank, rank = position - start[u], chunk by chunk
        for a in range(0, len(keys), self.CHUNK):
            seg = keys[a:a + self.CHUNK]
            seg -= np.arange(a, a + len(seg), dtype=np.int64) - start[seg // n_items]
        self.n_items = train.n_items
        # kept only for a subclass that asked for sentinel slots (it takes them, then drops this)
        self.keys_buffer = buf[:front + len(keys) + back] if (front or back) else None
        self.qkeys = torch.from_numpy(keys).to(device)
        self.start = torch.as_tensor(start, device=device)
        self.free = torch.as_tensor(train.n_items - counts, device=device)

    def sample(self, users: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        u = users.long()[:, None].expand(-1, n)     # int64: u * n_items can pass 2^31
        rand = torch.rand(u.shape, generator=generator, dtype=torch.float64).to(users.device)
        free = self.free[u]
        r = torch.minimum((rand * free.clamp_min(1)).long(), (free - 1).clamp_min(0))
        before = torch.searchsorted(self.qkeys, u * self.n_items + r, right=True) - self.start[u]
        neg = r + before
        return torch.where(free > 0, neg, (rand * self.n_items).long())


def _lookup(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table[idx]`` for a 1-D ``table`` by ``index_select`` (a few times faster on the CPU)."""
    return table.index_select(0, idx.reshape(-1)).view(idx.shape)


class BPRTask(Task):
    """BPR training over the training interactions of any model with ``bpr_terms``.

    ``sampler="interactions"``: every epoch visits each training interaction once in a
    seeded random order (RecBole). ``sampler="users"``: each batch slot draws a user
    uniformly, then one of the user's positives (LightGCN / PLD code); an epoch has
    ``n_train / batch_size`` batches (sampling with replacement: a data-parallel rank draws
    its own users and ignores :meth:`restrict`).

    ``denoise`` (:class:`~..denoise.DenoiseConfig`, ``train.denoise``; ``None`` = plain BPR)
    sets the objective, see :mod:`..denoise`:

    * ``bpr``: ``mean_b l_b + reg * mean_b l2_b``, exactly the plain task;
    * ``pld``: forces ``sampler="users"``. Epochs ``< warmup_epochs`` are plain BPR (the same
      batches and losses as ``kind: bpr`` with that sampler). Later batches hold, per slot, a
      user, a pool of ``pool`` of its training rows (``"pool" [B, k]``, ``"pos" [B, k]``), one
      shared negative set ``"neg" [B, n]`` and the Gumbel uniforms of the choice
      (``"noise" [B, k]``), all drawn from the epoch generator. :meth:`loss` makes ONE module
      call ``module(user, pool items [B, k], neg, choose)``: the module scores the B*k
      candidates and the negatives without autograd (:func:`choose_positive`; LightGCN from
      the propagation it does anyway, so it still propagates once per batch), ``choose`` turns
      them into the losses ``softplus(s_neg - s_pos)`` and draws one per slot with
      :func:`~..denoise.pld_choice`, and the module returns the plain BPR terms (with autograd
      and L2) of the chosen triples. Because the choice happens in :meth:`loss`, a PLD batch
      has no ``"idx"`` until :meth:`loss` writes the chosen rows there (the trainer reads
      ``idx`` after the loss). A module trained with PLD takes ``choose`` (MF, LightGCN);
    * ``tce``: the mean over the kept examples (:func:`~..denoise.tce_keep_mask`) of
      ``l_b + reg * l2_b``; the drop rate follows the batch's ``"iteration"`` (``epoch *
      batches_per_epoch + b``: batches trained so far, counted across epochs from 0);
    * ``rce``: ``mean_b w_b l_b + reg * mean_b l2_b``, ``w_b = sigmoid(s_ui)^alpha`` detached.

    Per-example losses returned for tracking are always the unweighted ``l_b`` (PLD: of the
    chosen candidate). ``stats`` holds light counters of the last batch for reports (tensors
    are detached and left on the device: reading them syncs, training does not).
    """

    sampler_class = NegativeSampler     # a subclass may bring its own (one sampler built, not two)

    def __init__(self, model: nn.Module, train: Interactions, batch_size: int, reg: float,
                 num_negatives: int = 1, sampler: str = "interactions",
                 denoise: Optional[DenoiseConfig] = None):
        self.model = model
        self.n_train = len(train)
        self.batch_size = batch_size
        self.reg = reg
        self.num_negatives = num_negatives
        self.denoise = denoise if denoise is not None else DenoiseConfig()
        self.denoise.validate()
        self.kind = self.denoise.kind
        if self.kind == "pld" and sampler != "users":
            log.info("train.denoise.kind pld draws a uniform user per slot: sampler %r -> 'users'", sampler)
            sampler = "users"
        self.sampler_kind = sampler
        self.stats: dict = {"kind": self.kind}
        dev = self.device
        # the split's int32 index arrays, shared (zero-copy on the CPU); batches are made int64
        self.users = torch.from_numpy(np.ascontiguousarray(train.user)).to(dev)
        self.items = torch.from_numpy(np.ascontiguousarray(train.item)).to(dev)
        self.negatives = self.sampler_class(train, dev)
        if sampler == "users":
            order = np.lexsort((train.item, train.user))
            counts = train.user_counts()
            self.by_user = torch.as_tensor(order, device=dev)
            self.user_start = torch.as_tensor(np.concatenate([[0], np.cumsum(counts)[:-1]]), device=dev)
            self.user_count = torch.as_tensor(counts, device=dev)
            self.active_users = torch.as_tensor(np.flatnonzero(counts > 0), device=dev)
            # some user has fewer positives than the PLD pool (known here: no sync per batch)
            self._pool_small = bool(((counts > 0) & (counts < self.denoise.pool)).any())

    def without_rows(self, drop_rows: torch.Tensor) -> None:
        """A graph model (LightGCN: ``rebuild_graph``) propagates over the kept rows' edges
        only; the negatives are still drawn as in the full training (common random numbers:
        a removed row's item is not offered to its user as a negative)."""
        rebuild = getattr(self.model, "rebuild_graph", None)
        if rebuild is not None:
            keep = ~drop_rows.cpu().numpy()
            rebuild(self.users.cpu().numpy()[keep], self.items.cpu().numpy()[keep])

    @property
    def visits_each_row_once(self) -> bool:
        """The interactions sampler visits every row once an epoch (PLD and the users sampler
        draw rows with replacement)."""
        return self.sampler_kind == "interactions" and self.kind != "pld"

    def batches(self, epoch: int, generator: torch.Generator) -> Iterator[dict]:
        it = self._batches(epoch, generator)
        if self.kind != "tce":
            yield from it
            return
        start = epoch * self.batches_per_epoch()
        for b, batch in enumerate(it):
            batch["iteration"] = start + b
            yield batch

    def batches_per_epoch(self) -> int:
        """Batches of one epoch: ``ceil(n_train / batch_size)`` (users sampler, at least one) or
        ``ceil(rows visited / batch_size)``."""
        if self.sampler_kind == "users":
            return max(1, -(-self.n_train // self.batch_size))
        n = self.n_train if self.visit is None else len(self.visit)
        return -(-n // self.batch_size)

    def _batches(self, epoch: int, generator: torch.Generator) -> Iterator[dict]:
        dev = self.device
        if self.sampler_kind == "users":
            n_batches = self.batches_per_epoch()
            pld = self.kind == "pld" and epoch >= self.denoise.warmup_epochs
            if self.kind == "pld":
                self.stats["pld_active"] = pld
            for _ in range(n_batches):
                pick = torch.randint(len(self.active_users), (self.batch_size,), generator=generator).to(dev)
                u = self.active_users[pick]
                if pld:
                    yield self._pld_batch(u, generator)
                    continue
                off = (torch.rand(self.batch_size, generator=generator).to(dev) * self.user_count[u]).long()
                idx = self.by_user[self.user_start[u] + off]
                yield self._batch(idx, generator)
        else:
            perm = self.visit_order(generator)
            for start in range(0, len(perm), self.batch_size):
                yield self._batch(perm[start:start + self.batch_size].long(), generator)

    def _batch(self, idx: torch.Tensor, generator: torch.Generator) -> dict:
        users = self.users[idx].long()
        return {"idx": idx, "user": users, "pos": self.items[idx].long(),
                "neg": self.negatives.sample(users, self.num_negatives, generator)}

    def _pld_batch(self, u: torch.Tensor, generator: torch.Generator) -> dict:
        """A PLD slot per user ``u``: ``pool`` of its training rows, one shared negative set and
        the choice's uniforms (generator order: ``[B, 2k]`` float64 uniforms, the first k for the
        pool, the last k for the choice; then the negatives)."""
        k = self.denoise.pool
        uni = torch.rand((len(u), 2 * k), generator=generator, dtype=torch.float64).to(self.device)
        off = pld_pool_offsets(_lookup(self.user_count, u), k, uni[:, :k], self._pool_small)
        rows = _lookup(self.by_user, _lookup(self.user_start, u)[:, None] + off)
        neg = self.negatives.sample(u, self.num_negatives, generator)
        return {"user": u.long(), "pool": rows, "pos": _lookup(self.items, rows).long(), "neg": neg,
                "noise": uni[:, k:]}

    @torch.no_grad()
    def all_losses(self, generator: torch.Generator, negatives: int = 1, chunk: int = 65536) -> torch.Tensor:
        """The BPR loss of every training row ``[n_train]`` under the current model, each
        against ``negatives`` fresh negatives drawn from ``generator`` (mean over them), eval
        mode, no update (``train.loss_pass: all``)."""
        return self.pair_losses(self.users, self.items, generator, negatives, chunk)

    @torch.no_grad()
    def pair_losses(self, users: torch.Tensor, items: torch.Tensor, generator: torch.Generator,
                    negatives: int = 1, chunk: int = 65536) -> torch.Tensor:
        """``mean_j softplus(s_uj - s_ui)`` of each ``(users[r], items[r])`` pair, trained on or
        not (held-out rows of a cross-fitted valuation), against ``negatives`` negatives per
        pair drawn from ``generator`` by the task's sampler (items outside the user's training
        rows); eval mode, no update, ``chunk`` pairs at a time."""
        module = self.model
        was_training = module.training
        module.eval()
        users = torch.as_tensor(users, device=self.device)
        items = torch.as_tensor(items, device=self.device)
        try:
            # final embeddings once (LightGCN: one propagation, cached in eval mode)
            if hasattr(module, "final_embeddings"):
                eu, ei = module.final_embeddings()
            else:
                eu, ei = module.user_emb.weight, module.item_emb.weight
            out = []
            for s in range(0, len(users), chunk):
                u = users[s:s + chunk]
                neg = self.negatives.sample(u, max(1, int(negatives)), generator)
                pu = eu.index_select(0, u)
                s_pos = (pu * ei.index_select(0, items[s:s + chunk])).sum(-1)
                s_neg = torch.einsum("bd,bnd->bn", pu, ei[neg])
                out.append(nn.functional.softplus(s_neg - s_pos[:, None]).mean(-1))
        finally:
            module.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, device=self.device)

    def example_losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        per, l2, _ = self._terms(batch)
        return per, l2

    def _terms(self, batch: dict, choose=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if choose is None:
            s_pos, s_neg, l2 = self.module(batch["user"], batch["pos"], batch["neg"])
        else:
            s_pos, s_neg, l2 = self.module(batch["user"], batch["pos"], batch["neg"], choose)
        return nn.functional.softplus(s_neg - s_pos[:, None]).mean(-1), l2, s_pos

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "pool" in batch:
            return self._pld_loss(batch)
        per, l2, s_pos = self._terms(batch)
        if self.kind == "tce":
            rate = tce_drop_rate(batch["iteration"], self.denoise.drop_rate, self.denoise.num_gradual)
            keep = tce_keep_mask(per, rate)
            n_keep = tce_keep_count(len(per), rate)
            w = keep.to(per.dtype)
            self.stats.update(iteration=batch["iteration"], drop_rate=rate, kept=n_keep,
                              dropped=len(per) - n_keep)
            return ((per * w).sum() + self.reg * (l2 * w).sum()) / n_keep, per.detach()
        if self.kind == "rce":
            w = rce_weights(s_pos, self.denoise.alpha)
            self.stats["mean_weight"] = w.mean()
            return (w * per).mean() + self.reg * l2.mean(), per.detach()
        return per.mean() + self.reg * l2.mean(), per.detach()

    def _pld_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One module call: the pool's losses without autograd, the PLD choice, then the plain
        BPR terms (with autograd) of the chosen triples. Writes ``batch["idx"]``."""
        picked: dict = {}
        per, l2, _ = self._terms(batch, self.pld_chooser(batch, picked))
        batch["idx"] = batch["pool"].gather(1, picked["col"][:, None]).squeeze(1)
        self.stats.update(pool_loss=picked["pool_loss"], chosen_loss=per.detach().mean())
        return per.mean() + self.reg * l2.mean(), per.detach()

    def pld_chooser(self, batch: dict, picked: dict):
        """PLD's choice for :func:`choose_positive`: each pool item's BPR loss against the
        slot's negatives, ``l_c = mean_j softplus(s_uj - s_uc)``, and one column per slot drawn
        with ``P(c) ∝ exp(-l_c / tau)`` from the batch's uniforms; records ``picked["col"]`` and
        ``picked["pool_loss"]``."""
        def choose(s_pool: torch.Tensor, s_neg: torch.Tensor) -> torch.Tensor:
            cand = nn.functional.softplus(s_neg[:, None, :] - s_pool[:, :, None]).mean(-1)   # [B, k]
            picked["col"] = pld_choice(cand, None, self.denoise.tau, uniforms=batch["noise"])
            picked["pool_loss"] = cand.mean()
            return picked["col"]
        return choose


@register_model("mf", MFConfig, capabilities=("bpr",), reads=())
def build_mf(opts: MFConfig, train: Interactions, train_cfg, device: str = "auto") -> BPRTask:
    dev = resolve_device(device)
    model = MF(train.n_users, train.n_items, opts.dim, opts.init_std, opts.init).to(dev)
    return BPRTask(model, train, train_cfg.batch_size, opts.reg, train_cfg.num_negatives, opts.sampler,
                   denoise=getattr(train_cfg, "denoise", None))
