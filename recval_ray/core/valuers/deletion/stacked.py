"""Batched leave-group-out retraining: B models trained at once as stacked parameters.

Model ``b`` of a stack is trained on the training rows whose group is not in ``drop[b]``
(``drop``: a boolean ``[B, n_groups]`` matrix; a group is a user, an item, or any grouping of
the rows; a row of ``drop`` that is all False is the full model). Every model starts from the
same initialisation and sees the same stream of batches (the task's own seeded batches over the
whole training set, negatives and dropout masks included); model ``b`` masks the examples of
its dropped groups. That is *exactly* training model ``b`` alone on the same batch stream with
those examples removed (:func:`train_reference` does that, one model at a time, with torch's own
optimisers), so a difference between two models of a stack is the deletion, never the seed
(common random numbers).

Embedding tables are stacked as ``[n_rows, B, width]`` (a row of every model is one
contiguous block, so gathering and scattering rows are plain row copies) and updated
row-sparsely: a batch gathers only the rows it touches (the same rows for every model), runs
the B forward and backward passes as batched matrix products, and scatters the updated rows
back. The
optimisers are the row-sparse forms that make this exact:

* ``adam``: tables follow :class:`torch.optim.SparseAdam` (lazy Adam: a row's moments and
  value change only in a step whose batch looks it up; ``m += (1-b1)(g-m)``,
  ``v += (1-b2)(g^2-v)``, ``p -= lr sqrt(1-b2^t)/(1-b1^t) m / (sqrt(v) + eps)``), dense layers
  follow :class:`torch.optim.Adam`. A row counts as looked up by model ``b`` when one of
  ``b``'s unmasked examples uses it; ``t`` counts the steps in which ``b`` had an example.
* ``sgd``: ``p -= lr g`` for tables and dense layers alike (the dense and the sparse form agree).

Weight decay is not supported (SparseAdam has none); a job that needs it uses
``engine: sequential``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.nn import functional as F

from ...train import epoch_generator


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Ask glibc's allocator to keep freed blocks below ``threshold`` bytes for reuse
    instead of returning them to the OS. A stack's step allocates tens of MB of temporaries;
    by default each comes back as fresh pages (an mmap, page faults, zeroing), which on CPU
    costs about 12% of an NCF step. Process-wide; meant for the worker processes that train
    stacks. Returns False where the allocator is not glibc's."""
    import ctypes
    import sys
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold))) and \
            bool(libc.mallopt(M_TRIM_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------
# stacked model adapters
# ---------------------------------------------------------------------------------------
class StackedModel:
    """B copies of one model: ``tables`` (name -> ``[n, B, w]`` row-sparse), ``dense``
    (name -> ``[B, ...]``). Subclasses define which rows a batch uses and the per-row loss."""

    reduction = "mean"          # batch loss: mean over the unmasked rows, or "sum"
    tables: dict
    dense: dict

    def lookups(self, batch: dict) -> tuple[dict, "torch.Tensor | dict"]:
        """``({table: row ids [R]}, example of each row [R])`` for the batch's R loss rows; or,
        when the tables look up different numbers of rows per loss row, ``({table: ids [R_t]},
        {table: example of each looked-up row [R_t], "loss": example of each loss row [R]})``."""
        raise NotImplementedError

    def row_losses(self, rows: dict, dense: dict, batch: dict) -> torch.Tensor:
        """Per-model per-row losses ``[B, R]``; ``rows[table]`` is ``[B, R_t, w]``."""
        raise NotImplementedError

    def load(self, module: torch.nn.Module, b: int) -> torch.nn.Module:
        """Copy model ``b``'s parameters into ``module`` (a plain model of the family)."""
        raise NotImplementedError

    def frozen_columns(self) -> dict:
        """table -> boolean ``[w]`` of columns that never train (e.g. unbiased SVD's biases)."""
        return {}

    # a stacked table is the side-by-side concatenation of the module's embedding tables
    # named here, e.g. {"user": ("user_gmf", "user_mlp")}
    table_parts: dict = {}

    def _stack_tables(self, model, B: int) -> None:
        self.tables = {t: _stack_table(torch.cat([getattr(model, a).weight for a in attrs], 1), B)
                       for t, attrs in self.table_parts.items()}

    def load_tables(self, module, b: int) -> None:
        """Copy model ``b``'s table columns back into the module's embedding tables."""
        with torch.no_grad():
            for t, attrs in self.table_parts.items():
                start = 0
                for a in attrs:
                    w = getattr(module, a).weight
                    w.copy_(self.tables[t][:, b, start:start + w.shape[1]])
                    start += w.shape[1]


def _stack(t: torch.Tensor, B: int) -> torch.Tensor:
    """``[B, ...]`` copies of a dense parameter."""
    return t.detach().unsqueeze(0).repeat(B, *([1] * t.dim())).contiguous()


def _stack_table(t: torch.Tensor, B: int) -> torch.Tensor:
    """``[n, B, w]`` copies of an embedding table ``[n, w]``."""
    return t.detach().unsqueeze(1).repeat(1, B, 1).contiguous()


class StackedNeuMF(StackedModel):
    """NeuMF (:mod:`...models.ncf`): user table ``[gmf | mlp]``, item table ``[gmf | mlp]``."""

    table_parts = {"user": ("user_gmf", "user_mlp"), "item": ("item_gmf", "item_mlp")}

    def __init__(self, model, B: int):
        self.d = model.user_gmf.weight.shape[1]
        self.explicit = bool(model.explicit)
        self._stack_tables(model, B)
        self.dense = {}
        for l, lin in enumerate(model.mlp):
            self.dense[f"mlp.{l}.weight"] = _stack(lin.weight, B)
            self.dense[f"mlp.{l}.bias"] = _stack(lin.bias, B)
        self.dense["out.weight"] = _stack(model.out.weight[0], B)
        self.dense["out.bias"] = _stack(model.out.bias[0], B)
        self.n_mlp = len(model.mlp)

    def lookups(self, batch):
        u, pos = batch["user"], batch["item"]
        ex = torch.arange(len(u), device=u.device)
        if self.explicit:
            return {"user": u, "item": pos}, ex
        n = batch["neg"].shape[1]
        users = torch.cat([u, u.repeat_interleave(n)])
        items = torch.cat([pos, batch["neg"].reshape(-1)])
        return {"user": users, "item": items}, torch.cat([ex, ex.repeat_interleave(n)])

    def logits(self, pu, qi, dense, masks=None):
        d = self.d
        g = pu[..., :d] * qi[..., :d]
        h = torch.cat([pu[..., d:], qi[..., d:]], -1)
        for l in range(self.n_mlp):
            if masks is not None:
                h = h * masks[l]
            h = F.relu(torch.baddbmm(dense[f"mlp.{l}.bias"].unsqueeze(1), h,
                                     dense[f"mlp.{l}.weight"].transpose(1, 2)))
        z = torch.cat([g, h], -1)
        return (z * dense["out.weight"].unsqueeze(1)).sum(-1) + dense["out.bias"].unsqueeze(1)

    def row_losses(self, rows, dense, batch):
        f = self.logits(rows["user"], rows["item"], dense, batch.get("masks"))
        if self.explicit:
            return (f - batch["rating"]).pow(2)
        b = len(batch["user"])
        return torch.cat([F.softplus(-f[:, :b]), F.softplus(f[:, b:])], 1)

    def load(self, module, b):
        self.load_tables(module, b)
        with torch.no_grad():
            for l, lin in enumerate(module.mlp):
                lin.weight.copy_(self.dense[f"mlp.{l}.weight"][b])
                lin.bias.copy_(self.dense[f"mlp.{l}.bias"][b])
            module.out.weight[0].copy_(self.dense["out.weight"][b])
            module.out.bias[0].copy_(self.dense["out.bias"][b])
        return module


class StackedBiasedMF(StackedModel):
    """Biased MF (:class:`...models.svd.BiasedMF`): tables ``[p | b]``; loss summed over the
    batch, ``0.5 ((r - r_hat)^2 + reg * penalty)`` as :class:`...models.svd.SVDTask`."""

    reduction = "sum"
    table_parts = {"user": ("user_emb", "user_bias"), "item": ("item_emb", "item_bias")}

    def __init__(self, model, B: int, reg: float):
        self.k = model.user_emb.weight.shape[1]
        self.reg = float(reg)
        self.biased = bool(model.biased)
        self.mu = float(model.mu)
        self._stack_tables(model, B)
        self.dense = {}

    def lookups(self, batch):
        u = batch["user"]
        return {"user": u, "item": batch["item"]}, torch.arange(len(u), device=u.device)

    def row_losses(self, rows, dense, batch):
        k = self.k
        pu, qi = rows["user"], rows["item"]
        r_hat = self.mu + (pu[..., :k] * qi[..., :k]).sum(-1)
        penalty = pu[..., :k].pow(2).sum(-1) + qi[..., :k].pow(2).sum(-1)
        if self.biased:
            r_hat = r_hat + pu[..., k] + qi[..., k]
            penalty = penalty + pu[..., k].pow(2) + qi[..., k].pow(2)
        return 0.5 * ((batch["rating"] - r_hat).pow(2) + self.reg * penalty)

    def sgd_step(self, batch: dict, weight: torch.Tensor, lr: float) -> None:
        """One SGD step of all B models in closed form (no autograd), in place.

        With ``e = w (r - r_hat)`` (``w`` ``[R, B]``: 1 where model b keeps the row), the
        gradient of the summed loss for a row's user vector is ``-e q_i + reg w p_u`` (and
        ``-e + reg w b_u`` for its bias), symmetrically for the item; gradients of repeated
        rows add up (``index_add_``), as in dense SGD."""
        k, reg = self.k, self.reg
        U, I = self.tables["user"], self.tables["item"]
        u, i = batch["user"], batch["item"]
        pu, qi, gu, gi = self._workspace(len(u))                         # [R, B, k+1] each
        torch.index_select(U, 0, u, out=pu)
        torch.index_select(I, 0, i, out=qi)
        torch.mul(pu, qi, out=gu)
        full = gu.sum(-1)                                                # includes b_u * b_i
        bu, bi = pu[..., k], qi[..., k]
        r_hat = self.mu + full - bu * bi
        if self.biased:
            r_hat = r_hat + bu + bi
        e = (batch["rating"].unsqueeze(1) - r_hat) * weight
        rw = (reg * weight).unsqueeze(-1)
        torch.mul(pu, rw, out=gu).addcmul_(qi, e.unsqueeze(-1), value=-1.0)
        torch.mul(qi, rw, out=gi).addcmul_(pu, e.unsqueeze(-1), value=-1.0)
        if self.biased:
            gu[..., k] = reg * weight * bu - e
            gi[..., k] = reg * weight * bi - e
        else:
            gu[..., k] = 0.0
            gi[..., k] = 0.0
        U.index_add_(0, u, gu, alpha=-lr)
        I.index_add_(0, i, gi, alpha=-lr)

    def _workspace(self, R: int) -> list:
        """Four ``[R, B, k+1]`` buffers reused across steps: allocating them anew each step
        costs more than the arithmetic on CPU (fresh pages from the OS every time)."""
        U = self.tables["user"]
        ws = getattr(self, "_ws", None)
        if ws is None or ws.shape[1] < R:
            ws = self._ws = U.new_empty((4, R) + tuple(U.shape[1:]))
        return [ws[j, :R] for j in range(4)]

    def frozen_columns(self):
        if self.biased:
            return {}
        col = torch.zeros(self.k + 1, dtype=torch.bool)
        col[self.k] = True
        return {"user": col, "item": col}

    def load(self, module, b):
        self.load_tables(module, b)
        return module


class StackedBPRMF(StackedModel):
    """MF trained with plain BPR (:class:`...models.mf.BPRTask`, ``kind: bpr``): tables
    ``user_emb``, ``item_emb``. An example's loss is that of the task,
    ``mean_k softplus(s_uj_k - s_ui) + reg * 0.5 (|p_u|^2 + |q_i|^2 + mean_k |q_j_k|^2)``,
    averaged over the model's kept examples; its item rows are the positive and the ``n``
    negatives (``R_item = (1 + n) R``)."""

    table_parts = {"user": ("user_emb",), "item": ("item_emb",)}

    def __init__(self, model, B: int, reg: float):
        self.reg = float(reg)
        self._stack_tables(model, B)
        self.dense = {}

    def lookups(self, batch):
        u, pos, neg = batch["user"], batch["pos"], batch["neg"]
        ex = torch.arange(len(u), device=u.device)
        n = neg.shape[1]
        return ({"user": u, "item": torch.cat([pos, neg.reshape(-1)])},
                {"user": ex, "item": torch.cat([ex, ex.repeat_interleave(n)]), "loss": ex})

    def row_losses(self, rows, dense, batch):
        pu, items = rows["user"], rows["item"]                     # [B, b, d], [B, b (1 + n), d]
        B, b, d = pu.shape
        qi, qj = items[:, :b], items[:, b:].reshape(B, b, -1, d)
        s_pos = (pu * qi).sum(-1)
        s_neg = torch.einsum("Bbd,Bbnd->Bbn", pu, qj)
        per = F.softplus(s_neg - s_pos.unsqueeze(-1)).mean(-1)
        l2 = 0.5 * (pu.pow(2).sum(-1) + qi.pow(2).sum(-1) + qj.pow(2).sum(-1).mean(-1))
        return per + self.reg * l2

    @torch.no_grad()
    def closed_step(self, batch: dict, weight: torch.Tensor, opt: "StackedOptimizer") -> None:
        """One step of all B models with the gradient in closed form (no autograd), in place.

        ``weight`` ``[b, B]``: 1 where model B keeps the example. With ``c_B`` the model's kept
        examples, ``w = weight / c_B`` and ``x_k = s_ui - s_uj_k``: ``g_k = -sigmoid(-x_k) w / n``;
        user rows ``sum_k g_k (q_i - q_j_k) + reg w p_u``; the positive ``(sum_k g_k) p_u + reg w
        q_i``; negative k ``-g_k p_u + reg w q_j_k / n``; then :meth:`StackedOptimizer.step` on
        the batch's rows (SGD, or lazy Adam on the rows each model looked up)."""
        u, pos, neg = batch["user"], batch["pos"], batch["neg"]
        b, n = neg.shape
        U, I = self.tables["user"], self.tables["item"]
        B, d = U.shape[1], U.shape[2]
        items = torch.cat([pos, neg.T.reshape(-1)])                  # blocks: positive, negative 1..n
        pu = U.index_select(0, u)                                    # [b, B, d]
        Q = I.index_select(0, items).view(1 + n, b, B, d)
        x = torch.einsum("kbBd,bBd->kbB", Q[:1] - Q[1:], pu)        # [n, b, B]
        w = weight / weight.sum(0).clamp_min(1.0)                    # [b, B]
        g = torch.sigmoid(-x).neg_().mul_(w / n)                     # dL/dx_k
        rw = (self.reg * w).unsqueeze(-1)
        gu = torch.einsum("kbB,kbBd->bBd", g, Q[:1] - Q[1:]).add_(pu * rw)
        gq = torch.empty_like(Q)
        torch.mul(pu, g.sum(0).unsqueeze(-1), out=gq[0]).add_(Q[0] * rw)
        torch.mul(pu.unsqueeze(0), g.neg().unsqueeze(-1), out=gq[1:]).add_(Q[1:] * (rw / n))
        looked = weight > 0
        rows, grads, touched = {}, {}, {}
        for name, idx, occ, look in (("user", u, gu, looked),
                                     ("item", items, gq.view((1 + n) * b, B, d), looked.repeat(1 + n, 1))):
            # the optimiser takes each row once: occurrences' gradients summed (as autograd does)
            rows[name], inv = torch.unique(idx, return_inverse=True)
            grads[name] = occ.new_zeros((len(rows[name]), B, d)).index_add_(0, inv, occ)
            touched[name] = look.new_zeros((len(rows[name]), B), dtype=weight.dtype).index_add_(
                0, inv, look.to(weight.dtype)) > 0
        opt.step(rows, grads, touched, {}, looked.any(0))

    def load(self, module, b):
        self.load_tables(module, b)
        return module


def stack_task(task, B: int) -> StackedModel:
    """The stacked form of a task's model (NeuMF, biased MF and MF with plain BPR)."""
    from ...models.mf import MF, BPRTask
    from ...models.ncf import NCFTask
    from ...models.svd import SVDTask
    if isinstance(task, NCFTask):
        return StackedNeuMF(task.model, B)
    if isinstance(task, SVDTask):
        return StackedBiasedMF(task.model, B, task.reg)
    if isinstance(task, BPRTask) and type(task.model) is MF:
        if task.kind != "bpr":
            raise TypeError(f"the batched engine trains MF with plain BPR, not train.denoise.kind "
                            f"{task.kind!r}; use the sequential engine")
        return StackedBPRMF(task.model, B, task.reg)
    raise TypeError(f"the batched deletion engine has no stacked form of {type(task.model).__name__}; "
                    "use valuation.engine: sequential")


# ---------------------------------------------------------------------------------------
# row-sparse optimisers over stacks
# ---------------------------------------------------------------------------------------
class StackedOptimizer:
    """Adam (lazy for tables, dense for layers) or SGD over a :class:`StackedModel`."""

    def __init__(self, stack: StackedModel, train_cfg, B: int):
        self.kind = train_cfg.optimizer
        if self.kind not in ("adam", "adamw", "sgd"):
            raise ValueError(f"unknown optimizer {self.kind!r}")
        if float(train_cfg.weight_decay) != 0.0:
            raise ValueError("the batched deletion engine does not support train.weight_decay != 0 "
                             "(row-sparse Adam has no decay); use valuation.engine: sequential")
        self.lr = float(train_cfg.lr)
        self.b1, self.b2, self.eps = 0.9, 0.999, 1e-8
        self.stack = stack
        self.t = torch.zeros(B, dtype=torch.float64)
        if self.kind != "sgd":
            self.m = {k: torch.zeros_like(v) for k, v in {**stack.tables, **stack.dense}.items()}
            self.v = {k: torch.zeros_like(v) for k, v in {**stack.tables, **stack.dense}.items()}

    def _bias(self, active: torch.Tensor):
        t = torch.where(active, self.t, torch.ones_like(self.t))
        return 1.0 - self.b1 ** t, 1.0 - self.b2 ** t

    def step(self, table_rows: dict, table_grads: dict, touched: dict, dense_grads: dict,
             active: torch.Tensor) -> None:
        """``table_rows[name]``: the unique rows gathered; ``table_grads[name]`` ``[n, B, w]``;
        ``touched[name]`` ``[n, B]``: rows model b looked up; ``active`` ``[B]``: models
        with an example in this batch."""
        dev = active.device
        self.t = self.t.to(dev) + active.double()
        frozen = self.stack.frozen_columns()
        if self.kind == "sgd":
            for name, rows in table_rows.items():
                g = table_grads[name]
                if name in frozen:
                    g = g.masked_fill(frozen[name].to(dev), 0.0)
                p = self.stack.tables[name]
                p.index_copy_(0, rows, p.index_select(0, rows) - self.lr * g * touched[name].unsqueeze(-1))
            for name, g in dense_grads.items():
                shape = (-1,) + (1,) * (g.dim() - 1)
                self.stack.dense[name] -= self.lr * g * active.view(shape)
            return
        bc1, bc2 = self._bias(active)
        b1, b2, eps, lr = self.b1, self.b2, self.eps, self.lr
        # tables: SparseAdam on the rows each model looked up
        step_size = (lr * bc2.sqrt() / bc1).float().view(1, -1, 1)
        for name, rows in table_rows.items():
            g = table_grads[name]
            p, m, v = self.stack.tables[name], self.m[name], self.v[name]
            m_old, v_old, p_old = m.index_select(0, rows), v.index_select(0, rows), p.index_select(0, rows)
            m_new = m_old + (g - m_old) * (1 - b1)
            v_new = v_old + (g * g - v_old) * (1 - b2)
            p_new = p_old - step_size * (m_new / (v_new.sqrt() + eps))
            keep = touched[name].unsqueeze(-1)
            if name in frozen:
                keep = keep & ~frozen[name].to(dev)
            m.index_copy_(0, rows, torch.where(keep, m_new, m_old))
            v.index_copy_(0, rows, torch.where(keep, v_new, v_old))
            p.index_copy_(0, rows, torch.where(keep, p_new, p_old))
        # dense layers: torch.optim.Adam
        for name, g in dense_grads.items():
            p, m, v = self.stack.dense[name], self.m[name], self.v[name]
            shape = (-1,) + (1,) * (g.dim() - 1)
            a = active.view(shape)
            m_new = m.lerp(g, 1 - b1)
            v_new = v * b2 + (1 - b2) * g * g
            denom = v_new.sqrt() / bc2.sqrt().float().view(shape) + eps
            p_new = p - (lr / bc1).float().view(shape) * m_new / denom
            m.copy_(torch.where(a, m_new, m))
            v.copy_(torch.where(a, v_new, v))
            p.copy_(torch.where(a, p_new, p))


# ---------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------
def train_stacked(task, train_cfg, drop: torch.Tensor, row_group: torch.Tensor, seed: int,
                  epochs: Optional[int] = None,
                  progress: Optional[Callable[[int, int], None]] = None,
                  closed_form_sgd: bool = True) -> StackedModel:
    """Train ``len(drop)`` models of ``task``'s family at once (see the module docstring).

    ``task``: built on the whole training set with initialisation seed ``seed`` (every model
    starts from its weights); ``drop`` ``[B, n_groups]`` bool; ``row_group`` ``[n_train]``: the
    group of each training row (-1 = never dropped). Epoch ``e`` draws from
    ``epoch_generator(seed, e)`` as :func:`...train.fit` does. ``closed_form_sgd``: let a stack
    with a hand-written gradient (``sgd_step``, ``closed_step``) skip autograd (False: the
    generic autograd path, which the tests compare them with).
    """
    dev = task.device
    B = int(drop.shape[0])
    drop = drop.to(dev)
    row_group = row_group.to(dev)
    stack = stack_task(task, B)
    opt = StackedOptimizer(stack, train_cfg, B)
    epochs = int(train_cfg.epochs if epochs is None else epochs)
    pad = torch.zeros(B, 1, dtype=torch.bool, device=dev)
    drop_ext = torch.cat([drop, pad], 1)        # column -1: rows that belong to no group
    # SGD on a model with a closed-form gradient skips autograd (same update, fewer passes)
    closed_form = closed_form_sgd and opt.kind == "sgd" and hasattr(stack, "sgd_step")
    closed_step = closed_form_sgd and hasattr(stack, "closed_step") and not frozen_columns_of(stack)
    for epoch in range(epochs):
        task.on_epoch_start(epoch)
        gen = epoch_generator(seed, epoch)
        for batch in task.batches(epoch, gen):
            if closed_form or closed_step:
                keep_rows = ~drop_ext.T[row_group[batch["idx"]]]           # [n_examples, B]
                if closed_form:
                    stack.sgd_step(batch, keep_rows.to(stack.tables["user"].dtype), opt.lr)
                else:
                    stack.closed_step(batch, keep_rows.to(stack.tables["user"].dtype), opt)
                continue
            keep_ex = ~drop_ext[:, row_group[batch["idx"]]]               # [B, n_examples]
            ids, ex_of_row = stack.lookups(batch)
            if not isinstance(ex_of_row, dict):
                ex_of_row = {**{name: ex_of_row for name in ids}, "loss": ex_of_row}
            w = keep_ex[:, ex_of_row["loss"]]                              # [B, R]
            wf = w.to(stack.tables["user"].dtype)
            uniq, inv, subs = {}, {}, {}
            for name, rows in ids.items():
                uniq[name], inv[name] = torch.unique(rows, return_inverse=True)
                subs[name] = stack.tables[name].index_select(0, uniq[name]).requires_grad_(True)
            dense = {k: v.detach().requires_grad_(True) for k, v in stack.dense.items()}
            gathered = {name: subs[name].index_select(0, inv[name]).transpose(0, 1) for name in subs}
            losses = stack.row_losses(gathered, dense, batch)
            per_model = (losses * wf).sum(1)
            if stack.reduction == "mean":
                per_model = per_model / wf.sum(1).clamp_min(1.0)
            leaves = list(subs.values()) + list(dense.values())
            grads = torch.autograd.grad(per_model.sum(), leaves)
            tg = dict(zip(subs, grads[:len(subs)]))
            dg = dict(zip(dense, grads[len(subs):]))
            touched = {name: torch.zeros(len(uniq[name]), B, device=dev).index_add_(
                0, inv[name], keep_ex[:, ex_of_row[name]].T.to(wf.dtype)) > 0 for name in subs}
            active = keep_ex.any(1)
            with torch.no_grad():
                opt.step(uniq, tg, touched, dg, active)
        if progress is not None:
            progress(epoch + 1, epochs)
    return stack


def frozen_columns_of(stack: StackedModel) -> bool:
    """Whether some table of ``stack`` has columns that never train."""
    return any(bool(c.any()) for c in stack.frozen_columns().values())


def _filter_batch(batch: dict, keep: torch.Tensor) -> dict:
    """The batch without the examples where ``keep`` is False (dropout-mask rows included)."""
    out = {k: v[keep] for k, v in batch.items() if k in ("idx", "user", "item", "pos", "rating", "neg")}
    if "masks" in batch:
        b = len(keep)
        n = batch["neg"].shape[1] if "neg" in batch else 0
        row_keep = torch.cat([keep, keep.repeat_interleave(n)]) if n else keep
        assert all(m.shape[0] == b * (1 + n) for m in batch["masks"])
        out["masks"] = [m[row_keep] for m in batch["masks"]]
    return out


def train_reference(task, train_cfg, dropped: torch.Tensor, row_group: torch.Tensor, seed: int,
                    epochs: Optional[int] = None) -> torch.nn.Module:
    """One model, trained alone on the batch stream of the whole data with the rows of the
    groups in ``dropped`` removed: the slow path the stacked engine must equal. Embedding
    tables get row-sparse gradients (the looked-up rows, as ``nn.Embedding(sparse=True)``)
    and :class:`torch.optim.SparseAdam`; other parameters :class:`torch.optim.Adam` (or plain
    SGD for ``train.optimizer: sgd``). A batch left empty is skipped."""
    model = task.model
    dev = task.device
    dropped = torch.as_tensor(dropped, device=dev)
    row_group = row_group.to(dev)
    tables = [p for n, p in model.named_parameters() if _is_table(n)]
    others = [p for n, p in model.named_parameters() if not _is_table(n) and p.requires_grad]
    lr = float(train_cfg.lr)
    if train_cfg.optimizer == "sgd":
        opts = [torch.optim.SGD([p for p in tables if p.requires_grad] + others, lr=lr)]
        sparse = False
    else:
        opts = [torch.optim.SparseAdam([p for p in tables if p.requires_grad], lr=lr)]
        if others:
            opts.append(torch.optim.Adam(others, lr=lr))
        sparse = True
    epochs = int(train_cfg.epochs if epochs is None else epochs)
    model.train()
    for epoch in range(epochs):
        task.on_epoch_start(epoch)
        gen = epoch_generator(seed, epoch)
        for batch in task.batches(epoch, gen):
            keep = ~torch.isin(row_group[batch["idx"]], dropped)
            if not bool(keep.any()):
                continue
            fb = _filter_batch(batch, keep)
            loss, _ = task.loss(fb)
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            if sparse:
                pos = fb["item"] if "item" in fb else fb["pos"]
                looked = {"user": fb["user"], "item": torch.cat([pos, fb["neg"].reshape(-1)])
                          if "neg" in fb else pos}
                for n, p in model.named_parameters():
                    if _is_table(n) and p.grad is not None:
                        rows = torch.unique(looked["user" if n.startswith("user") else "item"])
                        p.grad = torch.sparse_coo_tensor(rows[None], p.grad[rows], p.shape,
                                                         check_invariants=False)
            for o in opts:
                o.step()
    model.eval()
    return model


def _is_table(name: str) -> bool:
    return name.startswith(("user_", "item_")) and name.endswith("weight")
