"""LightGCN (He et al., SIGIR 2020) trained with the BPR loss.

Graph: the user-item bipartite graph of the TRAINING interactions only (binary, duplicates
counted once), over ``N = n_users + n_items`` nodes (users first, then items):

    A = [[0, R], [R^T, 0]],   A_hat = D^-1/2 A D^-1/2,   D = diag(A 1)

(isolated nodes get 0 instead of 1/sqrt(0)). ``A_hat`` is a torch sparse CSR tensor; no dense
``N x N`` tensor is ever built. Propagation, with the ego embeddings ``E^(0) = [P; Q]``
(``dim`` columns, the only parameters):

    E^(k+1) = A_hat E^(k),   k = 0..K-1,     E = (E^(0) + ... + E^(K)) / (K + 1)

and ``score(u, i) = e_u . e_i`` with the final embeddings. BPR per interaction (u, i) and a
sampled negative j (mean over ``num_negatives`` negatives), plus the L2 penalty on the
layer-0 embeddings of the batch as LightGCN-PyTorch,

    l = softplus(s_uj - s_ui),   reg * (||p_u||^2 + ||q_i||^2 + ||q_j||^2) / 2  (batch mean),

i.e. :class:`~.mf.BPRTask` over a module whose ``forward`` propagates once per batch.

``score_users`` propagates once and, outside training, caches the propagated embeddings. The
cache is keyed on the ego tables' version counters, so any in-place change (an optimiser
step, ``load_state_dict``) invalidates it, and it is dropped on ``train()``/``eval()``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from ..registry import register_model
from ..data import Interactions
from .base import resolve_device
from .mf import BPRTask, choose_positive, init_embeddings


@dataclass
class LightGCNConfig:
    """Options of ``model.kind: lightgcn``.

    ``dim``: embedding size; ``n_layers``: propagation steps K (0 = MF with mean of one
    layer); ``reg``: L2 weight on the batch's layer-0 embeddings; ``init``: ``normal``
    (N(0, init_std^2), LightGCN code) or ``xavier`` (RecBole); ``init_std``: std of ``normal``;
    ``sampler``: ``interactions`` (every training interaction once per epoch, RecBole) or
    ``users`` (a uniform user, then one of its positives, per slot: LightGCN / PLD code).
    """
    kind: str = "lightgcn"
    dim: int = 64
    n_layers: int = 3
    reg: float = 1e-4
    init: Literal["normal", "xavier"] = "normal"
    init_std: float = 0.1
    sampler: Literal["interactions", "users"] = "interactions"


def normalized_adjacency(train: Interactions, device="cpu", layout: str = "csr") -> torch.Tensor:
    """``A_hat = D^-1/2 A D^-1/2`` of the bipartite train graph, sparse ``[N, N]`` (float32).

    Built from the unique (user, item) pairs: edges (u, n_users + i) and (n_users + i, u),
    value ``1 / sqrt(deg(u) deg(i))``. ``layout``: ``csr`` (default, fast ``spmm``) or ``coo``.
    """
    return adjacency_of_pairs(train.pair_keys(), train.n_users, train.n_items, device, layout)


def adjacency_of_pairs(keys: np.ndarray, n_users: int, n_items: int, device="cpu",
                       layout: str = "csr") -> torch.Tensor:
    """:func:`normalized_adjacency` of the pairs ``keys = user * n_items + item`` (repeats
    counted once) over ``n_users + n_items`` nodes."""
    keys = np.unique(keys)
    u = keys // n_items
    i = keys % n_items + n_users
    n = n_users + n_items
    deg = np.bincount(u, minlength=n) + np.bincount(i, minlength=n)
    dinv = np.zeros(n, dtype=np.float64)
    nz = deg > 0
    dinv[nz] = deg[nz] ** -0.5
    rows = np.concatenate([u, i])
    cols = np.concatenate([i, u])
    vals = (dinv[rows] * dinv[cols]).astype(np.float32)
    idx = torch.as_tensor(np.stack([rows, cols]), dtype=torch.int64)
    if layout not in ("csr", "coo"):
        raise ValueError(f"layout: {layout!r} (expected csr or coo)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled")
        adj = torch.sparse_coo_tensor(idx, torch.as_tensor(vals), (n, n), check_invariants=True).coalesce()
        if layout == "csr":
            adj = adj.to_sparse_csr()
    return adj.to(device)


class _SymmetricSpMM(torch.autograd.Function):
    """``y = A x`` for a fixed symmetric sparse ``A``; the backward is ``A g`` (= ``A^T g``),
    which avoids the transposed sparse product autograd would build (much slower on CPU). Linear
    in ``x``, so its forward-mode derivative is ``A x_t`` and a batch of ``x`` (``vmap``) is one
    product with the batch folded into the columns: the ``torch.func`` transforms (per-example
    gradients, Hessian-vector products) work through it. ``A`` takes ``x``'s dtype and is
    passed wrapped (:class:`_Fixed`: a constant, not an input the transforms would inspect)."""

    @staticmethod
    def forward(adj: "_Fixed", x: torch.Tensor) -> torch.Tensor:
        return _as(adj.t, x) @ x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.adj = inputs[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, _SymmetricSpMM.apply(ctx.adj, grad)

    @staticmethod
    def jvp(ctx, adj_t, x_t):
        return _SymmetricSpMM.apply(ctx.adj, x_t)

    @staticmethod
    def vmap(info, in_dims, adj, x):
        x = x.movedim(in_dims[1], 1)                       # [N, batch, d]
        n, b, d = x.shape
        # (through apply again: outer transforms see this Function's rules, not a sparse product)
        return _SymmetricSpMM.apply(adj, x.reshape(n, b * d)).reshape(n, b, d), 1


class _Fixed:
    """A sparse matrix handed to :class:`_SymmetricSpMM` as a constant."""
    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor):
        self.t = t


def _as(adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return adj if adj.dtype == x.dtype else adj.to(x.dtype)


def propagate_embeddings(adj: torch.Tensor, n_layers: int, users: torch.Tensor,
                         items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LightGCN's final embeddings from ego tables ``users``, ``items``: the mean of
    ``E^(0..K)``, ``E^(k+1) = A_hat E^(k)`` (differentiable in the tables, every transform)."""
    e = torch.cat([users, items])
    acc = e
    fixed = _Fixed(adj)
    for _ in range(int(n_layers)):
        e = _SymmetricSpMM.apply(fixed, e)
        acc = acc + e
    out = acc / (int(n_layers) + 1)
    return out[:users.shape[0]], out[users.shape[0]:]


class LightGCN(nn.Module):
    """Ego embeddings ``P [n_users, dim]``, ``Q [n_items, dim]`` and a fixed sparse ``A_hat``.

    ``adj`` is a plain attribute (not a buffer: it stays out of ``state_dict`` and of DDP's
    buffer broadcast) moved along by ``.to()``/``.cuda()`` through ``_apply``.
    """

    def __init__(self, adj: torch.Tensor, n_users: int, n_items: int, dim: int, n_layers: int = 3,
                 init_std: float = 0.1, init: str = "normal"):
        super().__init__()
        if not adj.is_sparse and adj.layout != torch.sparse_csr:
            raise ValueError("adj must be a sparse tensor (COO or CSR)")
        self.n_users, self.n_items, self.n_layers = n_users, n_items, int(n_layers)
        self.adj = adj
        self.user_emb = nn.Embedding(n_users, dim)
        self.item_emb = nn.Embedding(n_items, dim)
        init_embeddings(init, init_std, self.user_emb, self.item_emb)
        self._cache = None  # (key, users [n_users, dim], items [n_items, dim])

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.adj = fn(self.adj)
        self._cache = None
        return out

    def __getstate__(self):
        """Pickle / deepcopy: a CSR tensor has no storage to copy, so ``adj`` travels as its
        index and value arrays and is rebuilt by ``__setstate__``."""
        state = dict(super().__getstate__())
        a = state.pop("adj")
        state["_cache"] = None
        if a.layout == torch.sparse_csr:
            state["_adj_csr"] = (a.crow_indices(), a.col_indices(), a.values(), tuple(a.shape))
        else:
            state["_adj_coo"] = a
        return state

    def __setstate__(self, state):
        state = dict(state)
        parts = state.pop("_adj_csr", None)
        adj = state.pop("_adj_coo", None)
        if parts is not None:
            crow, col, val, shape = parts
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta")
                warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly")
                adj = torch.sparse_csr_tensor(crow, col, val, shape, check_invariants=False)
        super().__setstate__(state)
        self.adj = adj

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def rebuild_graph(self, users: np.ndarray, items: np.ndarray) -> None:
        """Replace ``A_hat`` by the normalised graph of the pairs ``(users, items)`` (same
        nodes): a model trained without some training rows must not propagate over their
        edges either (:meth:`~.mf.BPRTask.without_rows`)."""
        keys = users.astype(np.int64) * np.int64(self.n_items) + items
        self.adj = adjacency_of_pairs(keys, self.n_users, self.n_items, layout="csr").to(
            self.user_emb.weight.device)
        self._cache = None

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Final embeddings ``(users [n_users, dim], items [n_items, dim])``: the mean of
        ``E^(0..K)`` with ``E^(k+1) = A_hat E^(k)`` (sparse x dense, differentiable in E;
        ``A_hat`` is symmetric, so the backward of each step is ``A_hat`` times the gradient)."""
        return propagate_embeddings(self.adj, self.n_layers, self.user_emb.weight, self.item_emb.weight)

    def _cache_key(self) -> tuple:
        w_u, w_i = self.user_emb.weight, self.item_emb.weight
        return (w_u._version, w_i._version, w_u.data_ptr(), w_i.data_ptr(), w_u.device)

    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Propagated embeddings; cached (without autograd) in eval mode under ``no_grad``,
        recomputed when the ego tables changed since (version counters) or in training."""
        if self.training or torch.is_grad_enabled():
            return self.propagate()
        key = self._cache_key()
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, *self.propagate())
        return self._cache[1], self._cache[2]

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        """``[B, n_items]`` scores ``e_u . e_i`` for every item."""
        eu, ei = self.final_embeddings()
        return eu[users] @ ei.T

    def forward(self, users, pos, neg, choose=None):
        return self.bpr_terms(users, pos, neg, choose)

    def bpr_terms(self, users, pos, neg, choose=None):
        """``(s_pos [B], s_neg [B, n], l2 [B])``: scores from one propagation; ``l2`` =
        (||p_u||^2 + ||q_i||^2 + mean_n ||q_j||^2) / 2 on the layer-0 (ego) embeddings. With
        ``choose`` (PLD), ``pos`` is a pool ``[B, k]`` and the terms are those of the positive
        :func:`~.mf.choose_positive` picks per row from the same propagation."""
        eu, ei = self.propagate()
        if choose is not None:
            pos = choose_positive(eu.detach(), ei.detach(), users, pos, neg, choose)
        pu, qi, qj = eu[users], ei[pos], ei[neg]
        s_pos = (pu * qi).sum(-1)
        s_neg = torch.einsum("bd,bnd->bn", pu, qj)
        p0, i0, j0 = self.user_emb(users), self.item_emb(pos), self.item_emb(neg)
        l2 = 0.5 * (p0.pow(2).sum(-1) + i0.pow(2).sum(-1) + j0.pow(2).sum(-1).mean(-1))
        return s_pos, s_neg, l2


@register_model("lightgcn", LightGCNConfig, capabilities=("bpr",), reads=())
def build_lightgcn(opts: LightGCNConfig, train: Interactions, train_cfg, device: str = "auto") -> BPRTask:
    """LightGCN over ``train``'s graph, trained by :class:`BPRTask` (built on the CPU, so the
    seeded initialisation is device-independent, then moved)."""
    if opts.n_layers < 0:
        raise ValueError(f"model.n_layers: {opts.n_layers} must be >= 0")
    dev = resolve_device(device)
    adj = normalized_adjacency(train)
    model = LightGCN(adj, train.n_users, train.n_items, opts.dim, opts.n_layers,
                     opts.init_std, opts.init).to(dev)
    return BPRTask(model, train, train_cfg.batch_size, opts.reg, train_cfg.num_negatives, opts.sampler,
                   denoise=getattr(train_cfg, "denoise", None))
