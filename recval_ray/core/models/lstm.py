"""LSTM next-item recommender (the model of the TracIn write-up, with its embeddings trained).

For user ``u`` with time-ordered items ``(i_0, ..., i_{n-1})`` and a target position ``t >= 1``,
the history ``H = (i_{t-W}, ..., i_{t-1})`` (at most ``window`` = W items, see
:mod:`recval_ray.core.sequences`) is encoded as

    e_k = E[h_k]  (E: (n_items + 1) x dim, row n_items = PAD = 0),
    z   = last hidden state of an LSTM(dim -> hidden, ``layers`` layers) over the real items of H,
    s   = W_o z + b_o  in R^{n_items},

and trained with the cross-entropy of the next item, ``l_t = -log softmax(s)_{i_t}``, one
example per training interaction after the user's first (``idx`` = the target's training row;
a user's first interaction is never a target, so its tracked loss stays NaN). Every parameter
is trained, the item embeddings included (the write-up's code detached them by mistake).

Padding is exact: histories are stored left-padded with ``PAD``; the model shifts each row so
its real items come first and reads the LSTM's output after the last real item (the LSTM is
causal, so the trailing ``PAD`` inputs never reach it). A history's scores therefore do not
depend on the window length or on the padding; the ``PAD`` embedding row is zero and gets no
gradient. An empty history (a user with no context) reads one ``PAD`` (zero) input.

Scoring: ``set_context(parts)`` stores each user's last ``window`` items over ``parts``
(validation: train; test: train + valid; the evaluation calls it), and
``score_users(users) = s(last window of u)``. Without a call the context is the training set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..registry import register_model
from ..data import Interactions
from ..sequences import build_windows, last_windows, pad_index
from .base import Task, resolve_device


@dataclass
class LSTMConfig:
    """``dim``: item-embedding size; ``hidden``: LSTM state size; ``layers``: stacked LSTM
    layers; ``window``: history length W (items before the target; the write-up used 49)."""
    kind: str = "lstm"
    dim: int = 64
    hidden: int = 64
    layers: int = 1
    window: int = 20

    def __post_init__(self):
        for name in ("dim", "hidden", "layers", "window"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")


class LSTMRec(nn.Module):
    """Item embedding -> LSTM -> linear over items; input ``[B, W]`` left-padded histories."""

    def __init__(self, n_users: int, n_items: int, dim: int = 64, hidden: int = 64,
                 layers: int = 1, window: int = 20):
        super().__init__()
        self.n_users, self.n_items, self.window = int(n_users), int(n_items), int(window)
        self.pad = pad_index(n_items)
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=self.pad)
        self.lstm = nn.LSTM(dim, hidden, num_layers=layers, batch_first=True)
        self.out = nn.Linear(hidden, n_items)
        self._context: torch.Tensor | None = None

    def encode(self, hist: torch.Tensor) -> torch.Tensor:
        """``z [B, hidden]``: the LSTM's last hidden state over each history's real items."""
        W = hist.shape[1]
        length = (hist != self.pad).sum(1)
        # left-padded -> left-aligned: row b reads column (j + W - len_b) mod W
        col = (torch.arange(W, device=hist.device)[None, :] + (W - length)[:, None]) % W
        x = self.item_emb(hist.gather(1, col))
        # the LSTM is causal: its output at step len_b - 1 has seen the real items only (the
        # trailing PADs come after it); no packing, so no host sync and one fused kernel
        out, _ = self.lstm(x)
        return out[torch.arange(len(hist), device=hist.device), (length - 1).clamp_min(0)]

    def forward(self, hist: torch.Tensor) -> torch.Tensor:
        """Next-item logits ``[B, n_items]`` for left-padded histories ``[B, W]``."""
        return self.out(self.encode(hist))

    # -- scoring -----------------------------------------------------------------------
    def set_context(self, parts: Sequence[Interactions]) -> None:
        """Score from each user's last ``window`` items over ``parts`` (train, or train + valid)."""
        ctx = last_windows(list(parts), self.n_users, self.window)
        self._context = torch.as_tensor(ctx, device=self.out.weight.device)

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        if self._context is None:
            raise RuntimeError("LSTMRec.score_users needs set_context(parts) first")
        if self._context.device != self.out.weight.device:
            self._context = self._context.to(self.out.weight.device)
        return self(self._context[users.to(self._context.device)])


class NextItemTask(Task):
    """Cross-entropy on the next item; an epoch visits every example once in a seeded order."""

    def __init__(self, model: LSTMRec, train: Interactions, batch_size: int):
        self.model = model
        self.n_train = len(train)
        self.batch_size = int(batch_size)
        hist, target, rows = build_windows(train, model.window)
        dev = self.device
        self.hist = torch.as_tensor(hist, device=dev)
        self.target = torch.as_tensor(target, device=dev)
        self.rows = torch.as_tensor(rows, device=dev)
        self.n_examples = len(rows)
        model.set_context([train])

    def restrict_targets(self, keep_rows: np.ndarray) -> int:
        """Keep only the examples whose target training row is in ``keep_rows`` (a boolean
        mask over the training rows, or row indices): the dropped interactions are no longer
        predicted, but stay in the other examples' histories and in the scoring context (the
        TracIn write-up's "training sequences removed"). Returns the number of examples kept."""
        keep_rows = np.asarray(keep_rows)
        if keep_rows.dtype != bool:
            mask = np.zeros(self.n_train, dtype=bool)
            mask[keep_rows.astype(np.int64)] = True
            keep_rows = mask
        if keep_rows.shape != (self.n_train,):
            raise ValueError(f"restrict_targets: mask of shape {keep_rows.shape}, expected ({self.n_train},)")
        sel = torch.as_tensor(keep_rows, device=self.rows.device)[self.rows]
        self.hist, self.target, self.rows = self.hist[sel], self.target[sel], self.rows[sel]
        self.n_examples = int(len(self.rows))
        return self.n_examples

    def batches(self, epoch: int, generator: torch.Generator) -> Iterator[dict]:
        perm = torch.randperm(self.n_examples, generator=generator).to(self.device)
        for s in range(0, self.n_examples, self.batch_size):
            b = perm[s:s + self.batch_size]
            yield {"idx": self.rows[b], "hist": self.hist[b], "target": self.target[b]}

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.module(batch["hist"])
        per = nn.functional.cross_entropy(logits, batch["target"], reduction="none")
        return per.mean(), per.detach()


@register_model("lstm", LSTMConfig, shard_by="user", capabilities=("sequential", "checkpoints"),
                reads=("timestamp",))
def build_lstm(opts: LSTMConfig, train: Interactions, train_cfg, device: str = "auto") -> NextItemTask:
    """Initialisation on the CPU (seeded by the caller), then moved to ``device``."""
    dev = resolve_device(device)
    model = LSTMRec(train.n_users, train.n_items, opts.dim, opts.hidden, opts.layers, opts.window)
    return NextItemTask(model.to(dev), train, train_cfg.batch_size)
