"""TracInCP for the LSTM next-item recommender (Ray-free): per-example gradients at saved
checkpoints, scores between training examples and queries, self-influence, proponents and
opponents (after "Estimating Training Data Influence by Tracing Gradient Descent", Pruthi et
al. 2020, as applied to sequential recommendation in seed 004).

For checkpoints ``w_1..w_k`` with learning rates ``eta_1..eta_k``, a training example ``z`` and
a test example ``z'``,

    TracInCP(z, z') = sum_i eta_i * grad l(w_i, z) . grad l(w_i, z'),

``l`` the example's next-item cross-entropy (:class:`~...models.lstm.LSTMRec`). Positive: a step
on ``z`` lowers the loss on ``z'`` (``z`` is a *proponent* of ``z'``); negative: it raises it
(an *opponent*). A **query** is a group of held-out examples (one example, all examples of one
target item, the whole validation split): its score is the sum of its examples' scores, i.e. the
dot product with the group's summed gradient.

Gradients (every trained parameter: item embeddings, every LSTM layer, the output layer). The
per-example gradients come from ``torch.func.vmap(grad(...))`` (``engine: vmap``; or one
``torch.func.grad`` of a tile's summed loss, ``engine: batched``, the same numbers) of a
functional LSTM that equals
``nn.LSTM`` (gate order i, f, g, o) with respect to the *inputs* of every parameterised operation:
the gathered item embeddings ``x_j`` (so the embedding table's gradient is ``sum_j e_{h_j} x
dl/dx_j``, padding rows excluded as ``padding_idx`` does), the gate pre-activations ``p_t`` of
every layer and step, and the logits ``s``. The parameter gradients are then exact outer-product
sums (the chain rule):

    dl/d[W_ih | W_hh | b_ih | b_hh] = sum_t dl/dp_t (x) [in_t; h_{t-1}; 1; 1],
    dl/d[W_o | b_o]                 = dl/ds (x) [z; 1],

so every parameter block of an example is a sum of outer products ``sum_p u_p (x) v_p``. (A
plain ``vmap(grad)`` with respect to the weights materialises an outer product per step and
example and is ~8x slower on a CPU, and ``nn.LSTM`` has no batching rule;
:func:`reference_per_example_grads`, one autograd call per example over the module's own named
parameters, checks these gradients in the tests.)

Variants (``variant``):

* ``all``: exact, all parameters. Query gradients are summed per group (:class:`ExactSpace`);
  a training tile's scores are, per block, ``sum_j dl/dx_j . Q_emb[h_j]`` (embeddings, one
  sparse x dense product), ``vec(sum_t u_t (x) v_t) . Q_lstm`` (LSTM, materialised per example)
  and ``a^T Q_out [z; 1]`` (output layer; for small groups ``(a . a_k)(z . z_k + 1)`` per query
  example).
* ``last-layer``: exact, the output layer (weight and bias) only; for two examples
  ``(a . a') (z . z' + 1)``, the factorised form of Captum's ``TracInCPFast``.
* ``random-projection``: each parameter block ``sum_p u_p (x) v_p`` is sketched to ``d1 * d2``
  (``d1 = isqrt(d)``, ``d2 = d // d1``) numbers as ``sum_p (P^T u_p) (x) (R^T v_p) / sqrt(d1 d2)``
  with Gaussian ``P``, ``R`` (the Kronecker projection of Captum's ``TracInCPFastRandProj``, here
  for every block, not only the last layer), drawn per checkpoint from ``(seed, checkpoint
  index)`` on the CPU: the same seed gives the same scores on any device, and inner products are
  preserved in expectation. A sketch is ``blocks x d`` numbers per example, so very many queries
  stay cheap.

Memory is bounded by tiling: training examples are processed ``tile`` at a time (their
gradients are computed once per checkpoint and dotted with every query), queries ``query_tile``
groups at a time inside a tile; no train x test gradient matrix is ever formed. Scores are
accumulated in float64, checkpoint by checkpoint in checkpoint order, so the result does not
depend on the tiling (up to float rounding), on the number of Ray actors, or on their order.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.func import grad, vmap

VARIANTS = ("all", "last-layer", "random-projection")


# ---------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------
@dataclass
class Examples:
    """Next-item examples: left-padded histories ``[N, W]`` (``PAD = n_items``) and targets."""
    hist: np.ndarray
    target: np.ndarray

    def __post_init__(self):
        self.hist = np.ascontiguousarray(self.hist, dtype=np.int64)
        self.target = np.ascontiguousarray(self.target, dtype=np.int64).reshape(-1)
        if self.hist.ndim != 2 or len(self.hist) != len(self.target):
            raise ValueError(f"Examples: histories {self.hist.shape} and targets {self.target.shape} do not match")

    def __len__(self) -> int:
        return len(self.target)

    def take(self, idx) -> "Examples":
        return Examples(self.hist[idx], self.target[idx])


@dataclass
class Queries:
    """Held-out examples grouped into queries: ``group[m]`` is the query of example ``m``;
    a query's score is the sum of its examples' scores."""
    examples: Examples
    group: np.ndarray
    n_groups: int

    def __post_init__(self):
        self.group = np.asarray(self.group, dtype=np.int64).reshape(-1)
        if len(self.group) != len(self.examples):
            raise ValueError("Queries: one group per example")
        if len(self.group) and (self.group.min() < 0 or self.group.max() >= self.n_groups):
            raise ValueError(f"Queries: groups must lie in [0, {self.n_groups})")

    @staticmethod
    def single(examples: Examples) -> "Queries":
        """Every example its own query (a train x test score matrix)."""
        return Queries(examples, np.arange(len(examples)), len(examples))

    @staticmethod
    def concat(parts: Sequence["Queries"]) -> "Queries":
        hist = np.concatenate([p.examples.hist for p in parts])
        target = np.concatenate([p.examples.target for p in parts])
        offsets = np.cumsum([0] + [p.n_groups for p in parts])
        group = np.concatenate([p.group + o for p, o in zip(parts, offsets)])
        return Queries(Examples(hist, target), group, int(offsets[-1]))


@dataclass
class Checkpoint:
    """One saved training state: the model's parameters and the learning rate of the epoch."""
    epoch: int
    lr: float
    state: dict

    @staticmethod
    def load(path: str) -> "Checkpoint":
        """A checkpoint written by :func:`recval_ray.core.train.fit` (``{"epoch", "lr", "model"}``)."""
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return Checkpoint(int(blob.get("epoch", -1)), float(blob["lr"]),
                          {k: v for k, v in blob["model"].items()})


def select_checkpoints(history: Sequence[dict], best_epoch: int, count: int) -> list[str]:
    """The checkpoint paths TracInCP sums over: the epochs up to and including the selected one
    (``best_epoch``; the weights trained past it are not the model's), ``count`` of them evenly
    spaced and always including the first and the selected epoch (``count <= 0``: all)."""
    recs = [h for h in history if h.get("checkpoint") and (best_epoch < 0 or h["epoch"] <= best_epoch)]
    if not recs:
        return []
    if count <= 0 or count >= len(recs):
        return [r["checkpoint"] for r in recs]
    idx = np.unique(np.round(np.linspace(0, len(recs) - 1, count)).astype(int))
    return [recs[i]["checkpoint"] for i in idx]


@dataclass
class TracInSpec:
    """How scores are computed: ``variant`` (see the module docstring), ``projection_dim`` d
    (per parameter block) and ``seed`` of the random projection, ``tile`` training (and query)
    examples per gradient pass, ``query_tile`` query groups per score product,
    ``self_influence``: also ``sum_i eta_i |grad l(w_i, z)|^2`` of every training example."""
    variant: str = "all"
    projection_dim: int = 4096
    seed: int = 0
    tile: int = 512
    query_tile: int = 16
    self_influence: bool = True
    engine: str = "vmap"

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown TracIn variant {self.variant!r} (expected {', '.join(VARIANTS)})")
        if self.engine not in ("vmap", "batched"):
            raise ValueError(f"unknown gradient engine {self.engine!r} (vmap or batched)")
        if self.tile < 1 or self.query_tile < 1 or self.projection_dim < 1:
            raise ValueError("tile, query_tile and projection_dim must be >= 1")


# ---------------------------------------------------------------------------------------
# the model as plain tensors, and per-example gradient factors
# ---------------------------------------------------------------------------------------
@dataclass
class LSTMParams:
    """The parameters of an :class:`~...models.lstm.LSTMRec` state, as plain tensors."""
    emb: torch.Tensor                       # [n_items + 1, dim], row n_items = PAD
    layers: list                            # per layer (W_ih [4h, in], W_hh [4h, h], b_ih, b_hh)
    out_w: torch.Tensor                     # [n_items, h]
    out_b: torch.Tensor                     # [n_items]

    @property
    def pad(self) -> int:
        return int(self.emb.shape[0] - 1)

    @property
    def hidden(self) -> int:
        return int(self.out_w.shape[1])

    @staticmethod
    def from_state(state: dict, device=None, dtype=None) -> "LSTMParams":
        def t(k):
            v = state[k].detach()
            return v.to(device=device, dtype=dtype or v.dtype)
        n_layers = sum(1 for k in state if k.startswith("lstm.weight_ih_l"))
        if "item_emb.weight" not in state or n_layers == 0 or "out.weight" not in state:
            raise ValueError("TracIn needs an LSTMRec state (item_emb, lstm, out); got keys "
                             + ", ".join(sorted(state)[:8]))
        if any(k.startswith("lstm.") and ("_reverse" in k or "weight_hr" in k) for k in state):
            raise ValueError("TracIn supports unidirectional LSTMs without projections")
        layers = [(t(f"lstm.weight_ih_l{k}"), t(f"lstm.weight_hh_l{k}"), t(f"lstm.bias_ih_l{k}"),
                   t(f"lstm.bias_hh_l{k}")) for k in range(n_layers)]
        return LSTMParams(t("item_emb.weight"), layers, t("out.weight"), t("out.bias"))

    @staticmethod
    def from_module(model) -> "LSTMParams":
        return LSTMParams.from_state(model.state_dict())


@dataclass
class Factors:
    """Per-example gradient factors of a tile of ``t`` examples (see the module docstring)."""
    items: torch.Tensor          # [t, W] the history left-aligned (real items first, then PAD)
    valid: torch.Tensor          # [t, W] real item (not PAD)
    gx: torch.Tensor             # [t, W, dim]  dl/dx_j, x_j the embedding of items[:, j]
    u: list                      # per layer [t, W, 4h]  dl/dp_t
    v: list                      # per layer [t, W, in + h + 2]  [in_t; h_{t-1}; 1; 1]
    a: torch.Tensor              # [t, n_items]  dl/ds
    z1: torch.Tensor             # [t, h + 1]  [z; 1]
    loss: torch.Tensor           # [t]
    cache: dict = field(default_factory=dict)


def _left_align(hist: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As :meth:`LSTMRec.encode`: row b reads column ``(j + W - len_b) mod W``; returns the
    aligned items and each row's length."""
    W = hist.shape[1]
    length = (hist != pad).sum(1)
    col = (torch.arange(W, device=hist.device)[None, :] + (W - length)[:, None]) % W
    return hist.gather(1, col), length


def example_factors(p: LSTMParams, hist: torch.Tensor, target: torch.Tensor, engine: str = "vmap") -> Factors:
    """Per-example gradient factors of ``l(w, (hist, target))`` for a tile, by ``torch.func``
    with respect to the embeddings, gate pre-activations and logits of every example.

    ``engine``: ``vmap`` (default): ``torch.func.vmap(grad(l))`` over the examples; ``batched``:
    one ``torch.func.grad`` of the tile's *summed* loss with respect to each example's own inputs
    and zero perturbations of its own pre-activations and logits: the examples are independent,
    so each example's slice of that gradient is exactly its per-example gradient (the same
    numbers from one batched forward and backward, ~25% faster on a CPU)."""
    items, length = _left_align(hist, p.pad)
    t, W = items.shape
    dt = p.emb.dtype
    x = p.emb[items]                                                  # [t, W, dim]
    sel = torch.nn.functional.one_hot((length - 1).clamp_min(0), W).to(dt)
    hid = p.hidden
    deltas = tuple(torch.zeros(t, W, 4 * hid, dtype=dt, device=x.device) for _ in p.layers)
    d_out = torch.zeros(t, p.out_w.shape[0], dtype=dt, device=x.device)
    layers, out_w, out_b = p.layers, p.out_w, p.out_b
    if engine == "vmap":
        # row-vector products (h @ W^T) batch into one matrix product under vmap
        tlayers = [(w_ih.T.contiguous(), w_hh.T.contiguous(), b_ih + b_hh) for w_ih, w_hh, b_ih, b_hh in layers]
        out_wt = out_w.T.contiguous()

        def one(x, deltas, d_out, sel, y):
            inp = x
            ins, hs = [], []
            for (w_ih_t, w_hh_t, b), d in zip(tlayers, deltas):
                pre_in = (inp @ w_ih_t + b + d).unbind(0)                 # W x [4h]
                h = x.new_zeros(hid)
                c = x.new_zeros(hid)
                outs, prev = [], []
                for s in range(W):
                    prev.append(h)
                    g = pre_in[s] + h @ w_hh_t
                    i, f, gg, o = g.chunk(4)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
                    h = torch.sigmoid(o) * torch.tanh(c)
                    outs.append(h)
                ins.append(inp)
                hs.append(torch.stack(prev))
                inp = torch.stack(outs)
            z = sel @ inp
            logits = z @ out_wt + out_b + d_out
            loss = torch.nn.functional.cross_entropy(logits[None], y[None])
            return loss, (z, tuple(ins), tuple(hs), loss)

        (gx, gd, ga), (z, ins, hs, loss) = vmap(grad(one, argnums=(0, 1, 2), has_aux=True))(x, deltas, d_out, sel,
                                                                                             target)
    elif engine == "batched":
        def total(x, deltas, d_out):
            inp = x
            ins, hs = [], []
            for (w_ih, w_hh, b_ih, b_hh), d in zip(layers, deltas):
                pre_in = (inp @ w_ih.T + b_ih + b_hh + d).unbind(1)       # W x [t, 4h]
                h = x.new_zeros(t, hid)
                c = x.new_zeros(t, hid)
                outs, prev = [], []
                for s in range(W):
                    prev.append(h)
                    g = pre_in[s] + h @ w_hh.T
                    i, f, gg, o = g.chunk(4, 1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
                    h = torch.sigmoid(o) * torch.tanh(c)
                    outs.append(h)
                ins.append(inp)
                hs.append(torch.stack(prev, 1))
                inp = torch.stack(outs, 1)
            z = (sel[:, :, None] * inp).sum(1)
            logits = z @ out_w.T + out_b + d_out
            loss = torch.nn.functional.cross_entropy(logits, target, reduction="none")
            return loss.sum(), (z, tuple(ins), tuple(hs), loss)

        (gx, gd, ga), (z, ins, hs, loss) = grad(total, argnums=(0, 1, 2), has_aux=True)(x, deltas, d_out)
    else:
        raise ValueError(f"unknown gradient engine {engine!r} (batched or vmap)")
    ones = x.new_ones(t, W, 2)
    v = [torch.cat([i, h, ones], 2) for i, h in zip(ins, hs)]
    z1 = torch.cat([z, z.new_ones(t, 1)], 1)
    return Factors(items, items != p.pad, gx, list(gd), v, ga, z1, loss.detach())


def factors_to_param_grads(f: Factors, p: LSTMParams) -> dict:
    """The dense per-example parameter gradients the factors stand for, named as in
    ``LSTMRec.named_parameters()`` (tests; memory ``t x #params``)."""
    t, W = f.items.shape
    n1, dim = p.emb.shape
    emb = torch.zeros(t, n1, dim, dtype=f.gx.dtype, device=f.gx.device)
    emb.view(t * n1, dim).index_add_(0, (torch.arange(t, device=f.items.device)[:, None] * n1 + f.items).reshape(-1),
                                     (f.gx * f.valid[..., None]).reshape(-1, dim))
    out = {"item_emb.weight": emb}
    for k, (u, v, (w_ih, w_hh, _, _)) in enumerate(zip(f.u, f.v, p.layers)):
        m = torch.einsum("twg,twv->tgv", u, v)
        n_in, h = w_ih.shape[1], w_hh.shape[1]
        out[f"lstm.weight_ih_l{k}"] = m[:, :, :n_in]
        out[f"lstm.weight_hh_l{k}"] = m[:, :, n_in:n_in + h]
        out[f"lstm.bias_ih_l{k}"] = m[:, :, n_in + h]
        out[f"lstm.bias_hh_l{k}"] = m[:, :, n_in + h + 1]
    out["out.weight"] = f.a[:, :, None] * f.z1[:, None, :-1]
    out["out.bias"] = f.a
    return out


def reference_per_example_grads(model, hist: torch.Tensor, target: torch.Tensor,
                                names: Optional[Sequence[str]] = None) -> dict:
    """The plain way: one ``torch.autograd.grad`` of the module's own forward per example, over
    its named parameters (``names``: a subset), stacked ``[t, *shape]`` (tests only)."""
    params = dict(model.named_parameters())
    names = list(names or params)
    out = {k: [] for k in names}
    for b in range(len(target)):
        with torch.enable_grad():
            loss = torch.nn.functional.cross_entropy(model(hist[b:b + 1]), target[b:b + 1])
            gs = torch.autograd.grad(loss, [params[k] for k in names], allow_unused=True)
        for k, g in zip(names, gs):
            out[k].append(torch.zeros_like(params[k]) if g is None else g.detach())
    return {k: torch.stack(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------
# gradient spaces: how factors become query vectors, scores and self-influence
# ---------------------------------------------------------------------------------------
class ExactSpace:
    """Exact inner products over the blocks ``emb``, ``lstm``, ``out`` (``last-layer``: out).

    Query side, per checkpoint: ``emb`` dense per group (``[groups, (n_items + 1) * dim]``),
    scored against a training tile as one sparse-dense product (a tile's embedding gradients
    have ``W * dim`` non-zeros per example); ``lstm`` dense per group; ``out`` dense per group
    for groups of many examples, and kept factorised (each example's ``a`` and ``[z; 1]``) for
    groups small enough that ``(a . a_k)(z . z_k)`` per example is cheaper than the dense
    product (single-example queries: a train x test matrix)."""

    def __init__(self, p: LSTMParams, blocks: Sequence[str], query_tile: int = 16):
        self.p, self.blocks, self.query_tile = p, tuple(blocks), int(query_tile)
        n_items, h1 = p.out_w.shape[0], p.hidden + 1
        self.small_limit = (n_items * h1) // (n_items + h1)

    def zeros(self, n: int, counts: Optional[np.ndarray] = None) -> dict:
        p, dev, dt = self.p, self.p.emb.device, self.p.emb.dtype
        acc: dict = {"n": int(n)}
        if "emb" in self.blocks:
            acc["emb"] = torch.zeros(n, *p.emb.shape, dtype=dt, device=dev)
        if "lstm" in self.blocks:
            acc["lstm"] = torch.zeros(n, sum(4 * w_hh.shape[1] * (w_ih.shape[1] + w_hh.shape[1] + 2)
                                             for w_ih, w_hh, _, _ in p.layers), dtype=dt, device=dev)
        if "out" in self.blocks:
            counts = np.zeros(n, np.int64) if counts is None else np.asarray(counts, np.int64)
            large = np.flatnonzero(counts > self.small_limit)
            pos = np.full(n, -1, np.int64)
            pos[large] = np.arange(len(large))
            acc["out_large"] = torch.as_tensor(large, device=dev)
            acc["out_pos"] = torch.as_tensor(pos, device=dev)
            acc["out"] = torch.zeros(len(large), p.out_w.shape[0], p.hidden + 1, dtype=dt, device=dev)
            acc["out_small"] = []
        return acc

    @staticmethod
    def _lstm_dense(f: Factors) -> torch.Tensor:
        """Every LSTM parameter's per-example gradient, ``[t, #LSTM parameters]`` (cached)."""
        if "lstm" not in f.cache:
            parts = [torch.bmm(u.transpose(1, 2), v).reshape(len(u), -1) for u, v in zip(f.u, f.v)]
            f.cache["lstm"] = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        return f.cache["lstm"]

    def accumulate(self, acc: dict, f: Factors, group: torch.Tensor) -> None:
        if "emb" in acc:
            n, n1, dim = acc["emb"].shape
            flat = (group[:, None] * n1 + f.items).reshape(-1)
            acc["emb"].view(n * n1, dim).index_add_(0, flat, (f.gx * f.valid[..., None]).reshape(-1, dim))
        if "lstm" in acc:
            acc["lstm"].index_add_(0, group, self._lstm_dense(f))
        if "out" in acc:
            pos = acc["out_pos"][group]
            big = torch.nonzero(pos >= 0).reshape(-1)
            for s in range(0, len(big), 32):
                b = big[s:s + 32]
                acc["out"].index_add_(0, pos[b], f.a[b, :, None] * f.z1[b, None, :])
            small = torch.nonzero(pos < 0).reshape(-1)
            if len(small):
                acc["out_small"].append((f.a[small], f.z1[small], group[small]))

    def finalize(self, acc: dict) -> dict:
        """Query-side layouts for the score products (after the last :meth:`accumulate`)."""
        if "emb" in acc:
            acc["emb_T"] = acc.pop("emb").reshape(acc["n"], -1).T.contiguous()     # [(n_items+1)*dim, groups]
        if "lstm" in acc:
            acc["lstm_T"] = acc.pop("lstm").T.contiguous()
        if "out_small" in acc:
            parts = acc.pop("out_small")
            if parts:
                acc["small_a"] = torch.cat([a for a, _, _ in parts])
                acc["small_z"] = torch.cat([z for _, z, _ in parts])
                acc["small_g"] = torch.cat([g for _, _, g in parts])
        return acc

    def scores(self, f: Factors, acc: dict) -> torch.Tensor:
        n = acc["n"]
        t = len(f.items)
        dev, dt = f.a.device, f.a.dtype
        s = torch.zeros(t, n, dtype=dt, device=dev)
        if "emb_T" in acc:
            dim = f.gx.shape[2]
            rows = torch.arange(t, device=dev).repeat_interleave(f.items.shape[1] * dim)
            cols = (f.items[:, :, None] * dim + torch.arange(dim, device=dev)).reshape(-1)
            S = torch.sparse_coo_tensor(torch.stack([rows, cols]), (f.gx * f.valid[..., None]).reshape(-1),
                                        (t, acc["emb_T"].shape[0]), check_invariants=False)
            s += torch.sparse.mm(S, acc["emb_T"])
        if "lstm_T" in acc:
            s += self._lstm_dense(f) @ acc["lstm_T"]
        if "out" in acc:
            large, Q = acc["out_large"], acc["out"]
            for q0 in range(0, len(large), self.query_tile):
                Qc = Q[q0:q0 + self.query_tile]                            # [q, n_items, h+1]
                tmp = f.a @ Qc.permute(1, 0, 2).reshape(Qc.shape[1], -1)  # [t, q*(h+1)]
                s[:, large[q0:q0 + self.query_tile]] += (tmp.view(t, len(Qc), -1) * f.z1[:, None, :]).sum(-1)
            if "small_a" in acc:
                for q0 in range(0, len(acc["small_g"]), 4096):
                    sl = slice(q0, q0 + 4096)
                    pair = (f.a @ acc["small_a"][sl].T) * (f.z1 @ acc["small_z"][sl].T)
                    s.index_add_(1, acc["small_g"][sl], pair)
        return s.double()

    def self_influence(self, f: Factors) -> torch.Tensor:
        s = torch.zeros(len(f.items), dtype=f.a.dtype, device=f.a.device)
        if "emb" in self.blocks:
            gx = f.gx * f.valid[..., None]
            same = (f.items[:, :, None] == f.items[:, None, :]) & f.valid[:, :, None] & f.valid[:, None, :]
            s += (torch.bmm(gx, gx.transpose(1, 2)) * same).sum((1, 2))
        if "lstm" in self.blocks:
            m = self._lstm_dense(f)
            s += (m * m).sum(1)
        if "out" in self.blocks:
            s += (f.a ** 2).sum(1) * (f.z1 ** 2).sum(1)
        return s.double()


def _kron_dims(d: int) -> tuple[int, int]:
    d1 = max(1, math.isqrt(int(d)))
    return d1, max(1, int(d) // d1)


class ProjectedSpace:
    """Kronecker-Gaussian sketches of every parameter block (see the module docstring)."""

    def __init__(self, p: LSTMParams, d: int, seed: int, checkpoint_index: int):
        self.p = p
        self.d1, self.d2 = _kron_dims(d)
        state = np.random.SeedSequence([int(seed), int(checkpoint_index), 0x7AC1]).generate_state(2, dtype=np.uint32)
        gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        dev, dt = p.emb.device, p.emb.dtype

        def gauss(m, k):
            return torch.randn(m, k, generator=gen, dtype=torch.float32).to(device=dev, dtype=dt)
        n1, dim = p.emb.shape
        self.P_item = gauss(n1, self.d1)
        self.P_item[p.pad] = 0.0
        self.P_dim = gauss(dim, self.d2)
        self.P_lstm = [(gauss(4 * w_hh.shape[1], self.d1), gauss(w_ih.shape[1] + w_hh.shape[1] + 2, self.d2))
                       for w_ih, w_hh, _, _ in p.layers]
        self.P_a = gauss(p.out_w.shape[0], self.d1)
        self.P_z = gauss(p.hidden + 1, self.d2)
        self.scale = 1.0 / math.sqrt(self.d1 * self.d2)
        self.dim = (2 + len(p.layers)) * self.d1 * self.d2

    def sketch(self, f: Factors) -> torch.Tensor:
        t = len(f.items)
        parts = [torch.einsum("twa,twb->tab", self.P_item[f.items], f.gx @ self.P_dim).reshape(t, -1)]
        for u, v, (Pu, Pv) in zip(f.u, f.v, self.P_lstm):
            parts.append(torch.einsum("twa,twb->tab", u @ Pu, v @ Pv).reshape(t, -1))
        parts.append(((f.a @ self.P_a)[:, :, None] * (f.z1 @ self.P_z)[:, None, :]).reshape(t, -1))
        return torch.cat(parts, 1) * self.scale

    def zeros(self, n: int, counts: Optional[np.ndarray] = None) -> torch.Tensor:
        return torch.zeros(n, self.dim, dtype=self.p.emb.dtype, device=self.p.emb.device)

    def finalize(self, acc: torch.Tensor) -> torch.Tensor:
        return acc

    def accumulate(self, acc: torch.Tensor, f: Factors, group: torch.Tensor) -> None:
        acc.index_add_(0, group, self.sketch(f))

    def scores(self, f: Factors, acc: torch.Tensor, sketch: Optional[torch.Tensor] = None) -> torch.Tensor:
        s = self.sketch(f) if sketch is None else sketch
        return (s @ acc.T).double()

    def self_influence(self, f: Factors, sketch: Optional[torch.Tensor] = None) -> torch.Tensor:
        s = self.sketch(f) if sketch is None else sketch
        return (s ** 2).sum(1).double()


def make_space(spec: TracInSpec, p: LSTMParams, checkpoint_index: int):
    if spec.variant == "random-projection":
        return ProjectedSpace(p, spec.projection_dim, spec.seed, checkpoint_index)
    return ExactSpace(p, ("out",) if spec.variant == "last-layer" else ("emb", "lstm", "out"), spec.query_tile)


# ---------------------------------------------------------------------------------------
# scores of one checkpoint, and the sum over checkpoints
# ---------------------------------------------------------------------------------------
def checkpoint_scores(ckpt: Checkpoint, index: int, train: Examples, queries: Optional[Queries],
                      spec: TracInSpec, device=None, dtype=None,
                      progress: Optional[Callable[[str], None]] = None) -> dict:
    """One checkpoint's lr-weighted partial scores: ``scores [N, groups]`` (float64, CPU numpy)
    between every training example and every query, ``self_influence [N]``, ``loss [N]`` (the
    training examples' losses at this checkpoint) and ``seconds``."""
    t0 = time.perf_counter()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    p = LSTMParams.from_state(ckpt.state, dev, dtype)
    space = make_space(spec, p, index)
    n_groups = queries.n_groups if queries is not None else 0
    counts = np.bincount(queries.group, minlength=n_groups) if queries is not None else None
    acc = space.zeros(max(1, n_groups), counts)
    tile = int(spec.tile)
    with torch.no_grad():
        if queries is not None and len(queries.examples):
            q_hist = torch.as_tensor(queries.examples.hist, device=dev)
            q_target = torch.as_tensor(queries.examples.target, device=dev)
            q_group = torch.as_tensor(queries.group, device=dev)
            for s in range(0, len(q_group), tile):
                f = example_factors(p, q_hist[s:s + tile], q_target[s:s + tile], spec.engine)
                space.accumulate(acc, f, q_group[s:s + tile])
        acc = space.finalize(acc)
        N = len(train)
        scores = np.zeros((N, n_groups), dtype=np.float64)
        self_inf = np.zeros(N, dtype=np.float64)
        loss = np.zeros(N, dtype=np.float64)
        hist = torch.as_tensor(train.hist)
        target = torch.as_tensor(train.target)
        for s in range(0, N, tile):
            f = example_factors(p, hist[s:s + tile].to(dev), target[s:s + tile].to(dev), spec.engine)
            sk = space.sketch(f) if isinstance(space, ProjectedSpace) else None
            if n_groups:
                sc = space.scores(f, acc, sk) if sk is not None else space.scores(f, acc)
                scores[s:s + tile] = sc.cpu().numpy()
            if spec.self_influence:
                si = space.self_influence(f, sk) if sk is not None else space.self_influence(f)
                self_inf[s:s + tile] = si.cpu().numpy()
            loss[s:s + tile] = f.loss.double().cpu().numpy()
            if progress is not None and (s // tile) % 20 == 19:
                progress(f"checkpoint {index} (epoch {ckpt.epoch}): {min(N, s + tile)}/{N} training examples")
    lr = float(ckpt.lr)
    return {"scores": lr * scores, "self_influence": lr * self_inf, "loss": loss,
            "seconds": np.float64(time.perf_counter() - t0), "epoch": np.int64(ckpt.epoch), "lr": np.float64(lr)}


def sum_partials(partials: Sequence[dict]) -> dict:
    """Sum per-checkpoint partials in the given (checkpoint) order."""
    if not partials:
        raise ValueError("TracIn needs at least one checkpoint")
    scores = np.zeros_like(partials[0]["scores"])
    self_inf = np.zeros_like(partials[0]["self_influence"])
    for part in partials:
        scores += part["scores"]
        self_inf += part["self_influence"]
    return {"scores": scores, "self_influence": self_inf,
            "checkpoint_seconds": [float(p["seconds"]) for p in partials],
            "epochs": [int(p["epoch"]) for p in partials], "lrs": [float(p["lr"]) for p in partials]}


def tracin_scores(checkpoints: Sequence[Checkpoint], train: Examples, queries: Optional[Queries],
                  spec: TracInSpec, device=None, dtype=None,
                  progress: Optional[Callable[[str], None]] = None) -> dict:
    """TracInCP in this process: :func:`checkpoint_scores` of every checkpoint, summed in order.
    Returns ``scores [N, groups]``, ``self_influence [N]`` and per-checkpoint facts."""
    parts = [checkpoint_scores(c, i, train, queries, spec, device, dtype, progress)
             for i, c in enumerate(checkpoints)]
    return sum_partials(parts)


# ---------------------------------------------------------------------------------------
# proponents and opponents
# ---------------------------------------------------------------------------------------
def top_k(scores: np.ndarray, k: int, proponents: bool = True) -> np.ndarray:
    """Indices of the ``k`` highest (proponents) or lowest (opponents) scores, ties by index;
    NaN never selected."""
    s = np.asarray(scores, np.float64)
    ok = np.flatnonzero(np.isfinite(s))
    key = -s[ok] if proponents else s[ok]
    order = ok[np.lexsort((ok, key))]
    return order[:int(k)]
