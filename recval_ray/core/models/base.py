"""The model interface every recommender of the project implements.

A model family is registered under ``model.kind`` with an options dataclass and a
factory ``build(options, train, train_cfg) -> Task``. A :class:`Task` bundles

* ``model``: a ``torch.nn.Module`` that is also a :class:`Recommender` (full-ranking scores
  for a batch of users, used by the metrics);
* ``batches(epoch, generator)``: the training batches of one epoch, each a dict of tensors on
  the model's device holding at least ``"idx"``: the training-interaction row each example
  stands for (so per-interaction losses can be tracked);
* ``loss(batch)``: ``(scalar loss to minimise, per-example losses aligned with batch["idx"])``.

Flags a task may set: ``closed_form`` (no epochs: the trainer calls ``fit_closed_form()``, e.g.
PureSVD); ``explicit`` (a rating-prediction model: ``model.predict(users, items)`` gives ratings,
selection can use validation ``rmse``/``mae`` and the test report adds MAE, RMSE and explained
variance); ``shard_by`` (``"row"`` or ``"user"``: how Ray Train splits the training rows across
workers). With ``"row"`` every worker builds the task on the whole training set and
:meth:`Task.restrict` it to rows ``rank::world``, so the negative sampler and LightGCN's graph
see all the data; with ``"user"`` (autoencoders, sequence models: a user's rows form one
example) a worker builds the task on the rows of users ``rank::world``.

The generic trainer (:mod:`recval_ray.core.train`) owns the optimiser, early stopping,
checkpoints and loss tracking, so a new model is one module plus a registration.
"""
from __future__ import annotations

from typing import Iterator, Optional, Protocol

import numpy as np

import torch


class Recommender(Protocol):
    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, n_items]`` of every item for a batch of user indices (higher = better)."""


class Task:
    """Base class of a trainable model + objective over one training set."""

    model: torch.nn.Module
    n_train: int
    closed_form: bool = False
    explicit: bool = False
    shard_by: str = "row"
    visit: Optional[torch.Tensor] = None
    # True when an epoch's batches hold each training row at most once (the trainer then
    # stores a row's loss instead of summing and counting its visits)
    visits_each_row_once: bool = False

    def restrict(self, rows) -> None:
        """Visit only the training rows ``rows`` (a data-parallel shard). What the task built
        from the whole training set (negative sampler, graph, user contexts) stays whole, so
        a shard's negatives are never another shard's positives."""
        self.visit = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=self.device)

    def visit_order(self, generator: torch.Generator) -> torch.Tensor:
        """A seeded random order of the rows to visit this epoch (all rows, or the shard): int32
        when the rows fit (the same permutation as int64, half the bytes); callers widen each
        batch's slice (``.long()``) before indexing with it."""
        if self.visit is None:
            dtype = torch.int32 if self.n_train < 2 ** 31 else torch.int64
            return torch.randperm(self.n_train, generator=generator, dtype=dtype).to(self.device)
        return self.visit[torch.randperm(len(self.visit), generator=generator).to(self.device)]

    def fit_closed_form(self, drop_rows=None) -> None:
        """Fit the model directly (closed-form models only); ``drop_rows`` (boolean
        ``[n_train]``): fit without those training rows (the exact removal: no batch stream)."""
        raise NotImplementedError

    @property
    def module(self) -> torch.nn.Module:
        """The module the loss calls: ``model`` itself, or a DDP wrapper set by the trainer."""
        return getattr(self, "_module", None) or self.model

    @module.setter
    def module(self, m: torch.nn.Module) -> None:
        self._module = m

    def batches(self, epoch: int, generator: torch.Generator) -> Iterator[dict]:
        raise NotImplementedError

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def without_rows(self, drop_rows: torch.Tensor) -> None:
        """Called by :func:`~..train.fit` before a training without ``drop_rows`` (boolean
        ``[n_train]``): rebuild what the task derived from the whole training set besides its
        batches, so the removed rows leave it too (LightGCN's graph). The batch stream is
        untouched (common random numbers; the trainer removes the rows from each batch). The
        default has nothing to rebuild."""

    def on_epoch_start(self, epoch: int) -> None:
        """Hook for schedules (e.g. warm-up, drop-rate ramps)."""

    def without_examples(self, batch: dict, keep: torch.Tensor) -> dict:
        """``batch`` without the examples where ``keep`` is False: every tensor whose first
        dimension is the batch's. The step then runs on the same batch stream with those
        training rows removed (common random numbers; :func:`~..train.fit`'s ``drop_rows``).
        Tasks whose batches are not one example per slot override it or raise."""
        n = len(keep)
        if "pool" in batch or "masks" in batch:
            raise NotImplementedError(f"{type(self).__name__}: removing rows from a batch of pools or dropout "
                                      f"masks is not supported")
        return {k: (v[keep] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v)
                for k, v in batch.items()}

    def release_data(self) -> None:
        """Drop what the task built from its training rows (index tensors, samplers, graphs,
        optimiser-side buffers) once training and valuation are done: the model still scores
        and predicts; :meth:`batches` and :meth:`loss` no longer work. Large per-row state is
        what goes: every tensor / array attribute, and helper objects holding them."""
        for name, value in list(vars(self).items()):
            if name in ("model", "_module") or isinstance(value, (int, float, str, bool, dict, type(None))):
                continue
            if isinstance(value, (torch.Tensor, np.ndarray)) or hasattr(value, "__dict__"):
                setattr(self, name, None)
        self.released = True

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
