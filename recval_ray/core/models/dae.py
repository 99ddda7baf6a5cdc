"""Autoencoder recommenders over a user's binary training row: the SVV DAE and Mult-DAE.

A user is the row ``x_u in {0, 1}^I`` of the training matrix (1 = the user interacted
with the item). Both models map a (corrupted) row through an MLP
``I -> h_1 -> ... -> h_k -> ... -> h_1 -> I`` (the decoder mirrors the encoder; the
activation follows every layer but the last) to logits ``z_u in R^I``.

``kind: dae`` (the SVV paper's DAE, Zhang et al. KDD 2025): ``I -> 50 (ReLU) -> I``,
``y_hat = sigmoid(z)``. The input is ``x * m`` with ``m_i ~ Bernoulli(1 - corruption)``
(masking noise, no rescaling), and the per-user loss is the confidence-weighted squared error

    L_u = sum_i (1 + rho x_ui) (y_hat_ui - x_ui)^2,        rho = 24.

``kind: multidae`` (Mult-DAE, Liang et al. WWW 2018): input ``x / ||x||_2`` with
inverted dropout (kept entries scaled by ``1 / (1 - dropout)``), tanh layers, and the
multinomial log-likelihood

    L_u = - sum_i x_ui log softmax(z_u)_i.

Training (:class:`AutoEncoderTask`): each epoch a seeded permutation of the users with
training data, cut into batches of ``train.batch_size`` users. The scalar loss is the mean
over the batch's users of ``L_u`` (so the gradient scale does not depend on the number of
items). Per-interaction losses for loss tracking: ``batch["idx"]`` are the training rows of
the batch's users and ``per`` their terms of ``L_u`` at the observed item: ``(1 + rho)
(y_hat_ui - 1)^2`` for the DAE, ``-log softmax(z_u)_i`` for Mult-DAE (the unobserved terms of
the DAE objective belong to no interaction and are not reported).

The training matrix is held as CSR structure (``indptr``/``indices`` tensors, O(nnz)); only
a batch is ever densified (``B x I``), never the whole matrix, whatever its size.

Subset-input contract (for Shapley-style value functions): ``model.reconstruct(x)`` maps ANY
input matrix ``x [B, I]`` (0/1 or real, e.g. a user's row restricted to a subset S of their
interactions) to the deterministic reconstruction ``y_hat [B, I]`` (sigmoid for the DAE,
softmax for Mult-DAE): no corruption or dropout, whatever the module's train/eval mode
(corruption lives in the task, not the module), row by row independent (a batch of subsets
equals the subsets one by one). ``score_users(users)`` reconstructs the users' rows of the
*context* matrix and returns the logits ``z`` (the same ranking as ``y_hat``, without the
float32 saturation of sigmoid/softmax that would tie top items). ``set_context(parts)``
makes the context the union of the given parts' (user, item) pairs: the evaluation calls it
with ``[train]`` for validation ranking and ``[train, valid]`` for test ranking, as
autoencoder recommenders read the user's whole known history at inference. With
``context: first`` only the first part (the training split) is used, as RecBole does (its
``full_sort_predict`` reads the training history matrix).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Literal, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..registry import register_model
from ..data import Interactions
from .base import Task, resolve_device

Activation = Literal["relu", "tanh", "sigmoid"]
_ACT = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


@dataclass
class DAEConfig:
    """The SVV paper's DAE.

    ``hidden``: encoder widths (decoder mirrors them), [50] = ``I -> 50 -> I``;
    ``activation``: after every layer but the output; ``corruption``: probability that an
    observed input entry is masked to 0 each time a user is visited (keep = 1 - corruption);
    ``rho``: confidence weight of observed entries, weight ``1 + rho x``; ``init``: ``torch``
    (nn.Linear's default, as the SVV code) or ``xavier`` (Xavier-normal weights, zero biases);
    ``context``: scoring input, ``all`` = union of the parts given to ``set_context``
    (train for validation, train + valid for test), ``first`` = the first part only (train).
    """
    kind: str = "dae"
    hidden: list[int] = field(default_factory=lambda: [50])
    activation: Activation = "relu"
    corruption: float = 0.5
    rho: float = 24.0
    init: Literal["torch", "xavier"] = "torch"
    context: Literal["all", "first"] = "all"


@dataclass
class MultiDAEConfig:
    """Mult-DAE.

    ``hidden``: encoder widths (decoder mirrors them); [200] = ``I -> 200 -> I`` (Liang et al.
    2018's Mult-DAE); RecBole 1.2.1's defaults are ``mlp_hidden_size [600]`` + ``latent_dimension
    64`` = [600, 64], i.e. ``I -> 600 -> 64 -> 600 -> I`` with tanh after every layer but the
    output (its encoder's MLPLayers also applies tanh to the latent). ``dropout``: inverted
    dropout on the L2-normalised input; ``init``: ``xavier`` (Xavier-normal weights, zero
    biases: RecBole) or ``torch``; ``context``: as :class:`DAEConfig`.
    """
    kind: str = "multidae"
    hidden: list[int] = field(default_factory=lambda: [200])
    activation: Activation = "tanh"
    dropout: float = 0.5
    init: Literal["torch", "xavier"] = "xavier"
    context: Literal["all", "first"] = "all"


class UserRows:
    """Per-user entries of a user x item structure on a device, CSR-like.

    Entries are sorted by (user, item); ``payload[k]`` is any per-entry value (the item, the
    training row). ``coords(users)`` gives, for a batch of users, the batch row of each of
    their entries and the entries' positions, without a loop over users.
    """

    def __init__(self, user: np.ndarray, item: np.ndarray, n_users: int, n_items: int,
                 device: torch.device = torch.device("cpu"), unique: bool = False):
        user, item = np.asarray(user, np.int64), np.asarray(item, np.int64)
        if unique:
            keys = np.unique(user * np.int64(n_items) + item)
            user, item, order = keys // n_items, keys % n_items, np.arange(len(keys))
        else:
            order = np.lexsort((item, user))
            user, item = user[order], item[order]
        counts = np.bincount(user, minlength=n_users)
        self.n_users, self.n_items = n_users, n_items
        self.indptr = torch.as_tensor(np.concatenate([[0], np.cumsum(counts)]), device=device)
        self.item = torch.as_tensor(item, device=device)
        self.row = torch.as_tensor(order, device=device)      # source row of each entry

    @property
    def device(self) -> torch.device:
        return self.indptr.device

    def to(self, device: torch.device) -> "UserRows":
        if torch.device(device) == self.device:
            return self
        out = object.__new__(UserRows)
        out.n_users, out.n_items = self.n_users, self.n_items
        out.indptr, out.item, out.row = (t.to(device) for t in (self.indptr, self.item, self.row))
        return out

    def counts(self, users: torch.Tensor) -> torch.Tensor:
        return self.indptr[users + 1] - self.indptr[users]

    def coords(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r, k)``: batch row ``r`` and entry position ``k`` of every entry of ``users``."""
        start = self.indptr[users]
        cnt = self.indptr[users + 1] - start
        total = int(cnt.sum())
        r = torch.repeat_interleave(torch.arange(len(users), device=users.device), cnt, output_size=total)
        k = torch.arange(total, device=users.device) - (cnt.cumsum(0) - cnt)[r] + start[r]
        return r, k

    def dense(self, users: torch.Tensor, values: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, I]`` float rows of ``users``: 1 at their entries (or ``values`` per entry)."""
        r, k = self.coords(users)
        out = torch.zeros(len(users), self.n_items, device=users.device)
        out[r, self.item[k]] = 1.0 if values is None else values
        return out


def _parts_rows(parts: Sequence[Interactions], device) -> UserRows:
    p0 = parts[0]
    user = np.concatenate([p.user for p in parts])
    item = np.concatenate([p.item for p in parts])
    return UserRows(user, item, p0.n_users, p0.n_items, device, unique=True)


class AutoEncoder(nn.Module):
    """``x [B, I] -> prep(x) (* noise) -> MLP -> logits [B, I]``, ``prep`` = identity (DAE) or
    row L2 normalisation (Mult-DAE); ``output`` = ``sigmoid`` or ``softmax`` reconstruction."""

    def __init__(self, n_users: int, n_items: int, hidden: Sequence[int], activation: str,
                 output: Literal["sigmoid", "softmax"], normalize: bool, init: str = "torch",
                 context: str = "all"):
        super().__init__()
        hidden = [int(h) for h in hidden]
        if not hidden or min(hidden) < 1:
            raise ValueError(f"hidden must be a non-empty list of positive widths, got {hidden}")
        dims = [n_items] + hidden + hidden[-2::-1] + [n_items]
        layers: list[nn.Module] = []
        for j, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if j < len(dims) - 2:
                layers.append(_ACT[activation]())
        self.net = nn.Sequential(*layers)
        if init == "xavier":
            for m in self.net:
                if isinstance(m, nn.Linear):
                    nn.init.xavier_normal_(m.weight)
                    nn.init.zeros_(m.bias)
        self.n_users, self.n_items = n_users, n_items
        self.output, self.normalize, self.context_mode = output, normalize, context
        self._context: Optional[UserRows] = None

    def prep(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) if self.normalize else x

    def forward(self, x: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``z = MLP(prep(x) * noise)`` (``noise``: a ``[B, I]`` multiplier or None)."""
        h = self.prep(x)
        if noise is not None:
            h = h * noise
        return self.net(h)

    def reconstruct(self, x: torch.Tensor, logits: bool = False) -> torch.Tensor:
        """Deterministic reconstruction of any input ``x [B, I]`` (no corruption): sigmoid or
        softmax of the logits (the logits themselves with ``logits=True``)."""
        z = self(x.to(self.net[0].weight.dtype))
        if logits:
            return z
        return torch.sigmoid(z) if self.output == "sigmoid" else torch.softmax(z, dim=1)

    # -- scoring ------------------------------------------------------------------------
    def set_context(self, parts: Sequence[Interactions]) -> None:
        """Score from the union of ``parts`` (``context: first``: ``parts[0]`` only)."""
        parts = list(parts)
        if not parts:
            raise ValueError("set_context needs at least one part")
        if self.context_mode == "first":
            parts = parts[:1]
        self._context = _parts_rows(parts, self.net[0].weight.device)

    def context_rows(self, users: torch.Tensor) -> torch.Tensor:
        """The users' binary input rows ``[B, I]`` from the context matrix."""
        if self._context is None:
            raise RuntimeError("no scoring context: call set_context(parts) first")
        self._context = self._context.to(users.device)
        return self._context.dense(users)

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        """Logits of ``reconstruct(context rows of users)``: ranking scores ``[B, I]``."""
        users = users.to(self.net[0].weight.device)
        return self.reconstruct(self.context_rows(users), logits=True)


class AutoEncoderTask(Task):
    """User-batched training of an :class:`AutoEncoder` (see the module docstring).

    ``loss``: ``weighted-mse`` (DAE, weight ``1 + rho x``) or ``multinomial`` (Mult-DAE).
    ``drop``: probability an observed input entry is zeroed; ``rescale``: kept entries are
    multiplied by ``1 / (1 - drop)`` (inverted dropout) when true.
    """

    shard_by = "user"

    def __init__(self, model: AutoEncoder, train: Interactions, batch_size: int,
                 loss: Literal["weighted-mse", "multinomial"], drop: float, rescale: bool,
                 rho: float = 0.0):
        if not 0.0 <= drop < 1.0:
            raise ValueError(f"corruption/dropout must be in [0, 1), got {drop}")
        self.model = model
        self.n_train = len(train)
        self.batch_size = max(1, int(batch_size))
        self.loss_kind, self.drop, self.rescale, self.rho = loss, float(drop), bool(rescale), float(rho)
        dev = self.device
        self.pairs = UserRows(train.user, train.item, train.n_users, train.n_items, dev, unique=True)
        self.rows = UserRows(train.user, train.item, train.n_users, train.n_items, dev)
        self.active = torch.as_tensor(np.flatnonzero(train.user_counts() > 0), device=dev)

    def batches(self, epoch: int, generator: torch.Generator) -> Iterator[dict]:
        dev = self.device
        perm = self.active[torch.randperm(len(self.active), generator=generator).to(dev)]
        for s in range(0, len(perm), self.batch_size):
            users = perm[s:s + self.batch_size]
            r, k = self.pairs.coords(users)
            x = torch.zeros(len(users), self.pairs.n_items, device=dev)
            x[r, self.pairs.item[k]] = 1.0
            batch = {"users": users, "x": x, "noise": None}
            if self.drop > 0:
                keep = torch.rand(len(k), generator=generator).to(dev) >= self.drop
                val = keep.float() / (1.0 - self.drop) if self.rescale else keep.float()
                noise = torch.ones_like(x)
                noise[r, self.pairs.item[k]] = val
                batch["noise"] = noise
            rr, kk = self.rows.coords(users)
            batch.update(idx=self.rows.row[kk], row=rr, item=self.rows.item[kk])
            yield batch

    def without_examples(self, batch: dict, keep: torch.Tensor) -> dict:
        """The batch without the training rows where ``keep`` (aligned with ``batch["idx"]``) is
        False: their entries leave the users' input and target vectors ``x`` (an entry stays
        while another kept row holds the same pair), users left with no row leave the batch,
        and ``row`` is renumbered over the users kept. The generic form cannot do this: ``x`` is
        per user, not per row (it used to pass through unchanged, so a removal trained on the
        removed rows anyway)."""
        row, item = batch["row"], batch["item"]
        x = batch["x"].clone()
        x[row[~keep], item[~keep]] = 0.0
        x[row[keep], item[keep]] = 1.0
        alive = torch.zeros(len(batch["users"]), dtype=torch.bool, device=x.device)
        alive[row[keep]] = True
        renumber = torch.cumsum(alive, 0) - 1
        out = dict(batch, users=batch["users"][alive], x=x[alive], idx=batch["idx"][keep],
                   row=renumber[row[keep]], item=item[keep])
        if batch.get("noise") is not None:
            out["noise"] = batch["noise"][alive]
        return out

    def terms(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L_u per batch user [B], per-interaction terms aligned with batch["idx"])``."""
        x = batch["x"]
        z = self.module(x, batch["noise"])
        if self.loss_kind == "weighted-mse":
            e = obs = (1.0 + self.rho * x) * (torch.sigmoid(z) - x) ** 2
        else:
            obs = -F.log_softmax(z, dim=1)
            e = obs * x
        return e.sum(1), obs[batch["row"], batch["item"]]

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        per_user, per = self.terms(batch)
        return per_user.mean(), per.detach()


def _build(model: AutoEncoder, train: Interactions, dev, **task_kw) -> AutoEncoderTask:
    model = model.to(dev)
    model.set_context([train])
    return AutoEncoderTask(model, train, **task_kw)


@register_model("dae", DAEConfig, shard_by="user", reads=())
def build_dae(opts: DAEConfig, train: Interactions, train_cfg, device: str = "auto") -> AutoEncoderTask:
    dev = resolve_device(device)
    model = AutoEncoder(train.n_users, train.n_items, opts.hidden, opts.activation, "sigmoid",
                        normalize=False, init=opts.init, context=opts.context)
    return _build(model, train, dev, batch_size=train_cfg.batch_size, loss="weighted-mse",
                  drop=opts.corruption, rescale=False, rho=opts.rho)


@register_model("multidae", MultiDAEConfig, shard_by="user", reads=())
def build_multidae(opts: MultiDAEConfig, train: Interactions, train_cfg,
                   device: str = "auto") -> AutoEncoderTask:
    dev = resolve_device(device)
    model = AutoEncoder(train.n_users, train.n_items, opts.hidden, opts.activation, "softmax",
                        normalize=True, init=opts.init, context=opts.context)
    return _build(model, train, dev, batch_size=train_cfg.batch_size, loss="multinomial",
                  drop=opts.dropout, rescale=True)
