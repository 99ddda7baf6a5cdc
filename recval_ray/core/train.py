"""The generic, Ray-free trainer: optimiser, seeded epochs, early stopping, checkpoints.

``fit(task, train_cfg, valid=...)`` trains any registered model (:mod:`.models.base`).
Model selection uses the validation split only (``train.select_metric``, e.g. ``ndcg@20``):
the best epoch's weights are restored at the end. Every epoch draws its randomness from a
generator seeded by ``(train.seed, epoch)``, on the CPU, so CPU and GPU runs, and local and
Ray Train runs, see the same batches. Per-interaction training losses are tracked so loss-based
valuers (small loss, PLD) read them without another pass.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional, Sequence

import numpy as np
import torch

from .registry import MODELS
from .data import Interactions
from .evaluation import evaluation_users, predict_ratings  # noqa: F401 - predict_ratings re-exported
from .metrics import parse_metric, ranking_metrics
from .models.base import Task

log = logging.getLogger("recval_ray.train")


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator for one epoch, a pure function of ``(seed, epoch)``."""
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def loss_generator(seed: int, epoch: Optional[int] = None) -> torch.Generator:
    """The generator of the end-of-epoch loss pass (``train.loss_pass: all``): its own stream,
    so the pass never shifts the training batches (``epoch=None``: a stream for losses of the
    final, selected model)."""
    key = [int(seed), 0x1055] + ([int(epoch)] if epoch is not None else [0, 1])
    state = np.random.SeedSequence(key).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def build_task(model_cfg, train: Interactions, train_cfg) -> Task:
    """Build the registered model of ``model_cfg.kind``; initialisation seeded by ``train.seed``."""
    factory = MODELS.engine(model_cfg.kind, getattr(train_cfg, "engine", "autograd"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(train_cfg.seed))
        return factory(model_cfg, train, train_cfg, train_cfg.device)


def make_optimizer(params, train_cfg) -> torch.optim.Optimizer:
    kind = train_cfg.optimizer
    if kind == "adam":
        return torch.optim.Adam(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    raise ValueError(f"unknown optimizer {kind!r}")


@dataclass
class TrainResult:
    task: Task
    history: list = field(default_factory=list)
    best_epoch: int = -1
    best_valid: float = float("nan")
    interaction_loss: Optional[np.ndarray] = None
    checkpoints: list = field(default_factory=list)
    seconds: float = 0.0
    epochs_run: int = 0
    rows_held: Optional[list] = None    # Ray Train: the training rows each rank's task was built from

    @property
    def model(self) -> torch.nn.Module:
        return self.task.model


RATING_METRICS = ("rmse", "mae")


def higher_is_better(metric: str) -> bool:
    return metric not in RATING_METRICS


def validation_score(model, valid: Interactions, exclude: Sequence[Interactions], metric: str,
                     eval_cfg=None, users: Optional[np.ndarray] = None) -> float:
    """The selection metric of ``model`` on the validation split: a ranking metric (e.g.
    ``ndcg@20``, training items excluded) or, for rating models, ``rmse`` / ``mae``.
    ``users``: the users to average over (default: ``evaluation_users(eval_cfg, valid)``,
    i.e. ``evaluate.users`` or the seeded sample of ``evaluate.sample_users``)."""
    if metric in RATING_METRICS:
        if valid.rating is None:
            raise ValueError(f"select_metric {metric} needs ratings in the data")
        model_was_training = model.training
        model.eval()
        err = predict_ratings(model, valid) - valid.rating
        model.train(model_was_training)
        return float(np.sqrt(np.mean(err ** 2)) if metric == "rmse" else np.mean(np.abs(err)))
    name, k = parse_metric(metric)
    if users is None:
        users, _ = evaluation_users(eval_cfg, valid)
    kw = {"users": users}
    if eval_cfg is not None:
        kw.update(ndcg_variant=eval_cfg.ndcg_variant, recall_variant=eval_cfg.recall_variant,
                  batch_users=eval_cfg.batch_users)
    model_was_training = model.training
    model.eval()
    if hasattr(model, "set_context"):
        model.set_context(list(exclude))
    try:
        with torch.no_grad():
            dev = next(model.parameters()).device
            out = ranking_metrics(model.score_users, valid, exclude, metrics=[metric],
                                  ks=[k] if k else [], device=dev, **kw)
    finally:
        model.train(model_was_training)
    return float(out[metric])


def fit(task: Task, train_cfg, *, valid: Optional[Interactions] = None,
        exclude: Sequence[Interactions] = (), eval_cfg=None,
        checkpoint_dir: Optional[str] = None, track_losses: bool = True,
        on_epoch: Optional[Callable[[dict, Task], None]] = None,
        should_stop: Optional[Callable[[bool], bool]] = None,
        epoch_context: Optional[Callable[[], ContextManager]] = None,
        log_prefix: str = "", drop_rows: Optional[torch.Tensor] = None) -> TrainResult:
    """Train ``task`` for ``train.epochs`` epochs with early stopping on validation.

    ``drop_rows`` (boolean ``[n_train]``): training rows removed from every batch they fall in
    (:meth:`~.models.base.Task.without_examples`): the same initialisation and batch stream as
    the full training, minus those rows (common random numbers; leave-one-out checks).
    ``exclude`` are the interactions removed from the validation ranking (the training
    set). ``on_epoch(record, task)`` is called after each epoch (Ray Train reports there).
    ``interaction_loss[r]`` is the mean loss of training row ``r`` over the last
    ``train.loss_epochs`` epochs up to and including the selected epoch: with
    ``train.loss_pass: visited`` the losses of the batches that visited it (NaN if unseen);
    with ``all``, the loss of every row under the model at the end of each epoch
    (``task.all_losses``, ``train.loss_negatives`` seeded negatives per row, no update), so
    rows a sampler visits rarely (PLD's high-loss rows) are measured like the others.
    ``epoch_context()`` wraps each epoch's batch loop (data-parallel ranks with uneven batch
    counts use DDP's ``Join`` there). Validation runs after every ``train.eval_every``-th
    epoch (``patience`` counts validations), on ``evaluate.sample_users`` seeded users when
    set (:func:`.evaluation.evaluation_users`: the same users every epoch and for every
    model trained on this split).
    """
    model = task.model
    dev = task.device
    use_valid = valid is not None and len(valid) > 0
    metric = train_cfg.select_metric
    if task.closed_form:
        return _fit_closed_form(task, valid if use_valid else None, exclude, metric, eval_cfg, on_epoch, drop_rows)
    if drop_rows is not None:
        task.without_rows(drop_rows)        # e.g. LightGCN's graph without the removed rows' edges
    sign = 1.0 if higher_is_better(metric) else -1.0
    loss_pass_all = track_losses and getattr(train_cfg, "loss_pass", "visited") == "all"
    once = not loss_pass_all and bool(getattr(task, "visits_each_row_once", False))
    if loss_pass_all and not hasattr(task, "all_losses"):
        raise ValueError(f"train.loss_pass: all is not supported by model {type(model).__name__} "
                         f"(its task has no all_losses); use loss_pass: visited")
    # a task with ``train_step(batch) -> (loss, per)`` updates its model itself (train.engine:
    # sparse, core/fast_bpr.py); every other task is stepped by autograd and a torch optimiser
    train_step = getattr(task, "train_step", None)
    opt = make_optimizer(model.parameters(), train_cfg) if train_step is None else None
    best, best_epoch, best_state, bad_evals = -math.inf, -1, None, 0
    history, checkpoints = [], []
    # the per-row losses of the last `loss_epochs` epochs, and (references to) the window as it
    # was at the best epoch so far: at most 2 x loss_epochs arrays of n_train float32 are held
    loss_ring: collections.deque = collections.deque(maxlen=max(1, train_cfg.loss_epochs))
    best_window: Optional[list] = None
    t0 = time.perf_counter()
    if checkpoint_dir:
        os.makedirs(checkpoint_dir, exist_ok=True)
    # the validation users (the seeded sample of evaluate.sample_users), drawn once
    valid_users = evaluation_users(eval_cfg, valid)[0] if use_valid and metric not in RATING_METRICS else None
    epoch = -1
    for epoch in range(train_cfg.epochs):
        te = time.perf_counter()
        model.train()
        task.on_epoch_start(epoch)
        gen = epoch_generator(train_cfg.seed, epoch)
        # a task that visits each row at most once an epoch stores the row's loss (4 bytes a
        # row); others sum the visits' losses and count them (8 bytes a row)
        loss_last = torch.full((task.n_train,), math.nan, device=dev) if track_losses and once else None
        loss_sum = torch.zeros(task.n_train, device=dev) if track_losses and not once else None
        loss_cnt = torch.zeros(task.n_train, device=dev) if track_losses and not once else None
        total, n_batches = torch.zeros((), device=dev), 0
        # a task that records its per-row losses itself (train.engine: native) writes them here
        own_losses = loss_last is not None and getattr(task, "writes_row_losses", False)
        if own_losses:
            task.row_losses = loss_last
        with (epoch_context() if epoch_context is not None else contextlib.nullcontext()):
            for batch in task.batches(epoch, gen):
                if drop_rows is not None:
                    keep = ~drop_rows[batch["idx"]]
                    if not bool(keep.all()):
                        if not bool(keep.any()):
                            continue
                        batch = task.without_examples(batch, keep)
                if train_step is not None:
                    loss, per = train_step(batch)
                else:
                    loss, per = task.loss(batch)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                total += loss.detach()
                n_batches += 1
                if loss_last is not None:
                    if not own_losses:          # (else the task's step wrote them already)
                        loss_last.index_copy_(0, batch["idx"], per.float())
                elif track_losses:
                    loss_sum.index_add_(0, batch["idx"], per.float())
                    loss_cnt.index_add_(0, batch["idx"], torch.ones_like(per, dtype=torch.float32))
        if track_losses and loss_pass_all:
            loss_ring.append((epoch, task.all_losses(loss_generator(train_cfg.seed, epoch),
                                                     int(getattr(train_cfg, "loss_negatives", 1))).cpu().numpy()))
        elif loss_last is not None:
            loss_ring.append((epoch, loss_last.cpu().numpy()))
        elif track_losses:
            loss_ring.append((epoch, (loss_sum / loss_cnt).cpu().numpy()))
        loss_last = loss_sum = loss_cnt = None
        if own_losses:
            task.row_losses = None
        record = {"epoch": epoch, "train_loss": float(total) / max(1, n_batches),
                  "epoch_seconds": time.perf_counter() - te}
        improved = False
        if use_valid and (epoch + 1) % train_cfg.eval_every == 0:
            score = validation_score(model, valid, exclude, metric, eval_cfg, users=valid_users)
            record[f"valid_{metric}"] = score
            if sign * score > best:
                best, best_epoch, bad_evals, improved = sign * score, epoch, 0, True
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad_evals += 1
        elif not use_valid:
            best_epoch, improved = epoch, True
        if improved and track_losses:
            best_window = list(loss_ring)
        elif (track_losses and loss_ring.maxlen == 1 and best_window is not None
              and f"valid_{metric}" in record):
            # a one-epoch window of an epoch that was not selected is never read again
            loss_ring.clear()
        if checkpoint_dir:
            path = os.path.join(checkpoint_dir, f"epoch_{epoch:04d}.pt")
            lr = opt.param_groups[0]["lr"] if opt is not None else float(train_cfg.lr)
            torch.save({"epoch": epoch, "lr": lr, "model": model.state_dict()}, path)
            checkpoints.append(path)
            record["checkpoint"] = path
        history.append(record)
        msg = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in record.items() if k != "checkpoint")
        level = logging.INFO if epoch % 10 == 0 else logging.DEBUG      # every epoch with -v
        log.log(level, "%s%s", log_prefix, msg)
        if on_epoch is not None:
            on_epoch(record, task)
        stop = use_valid and bad_evals >= max(1, train_cfg.patience)
        if should_stop is not None:
            stop = should_stop(stop)
        if stop:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    interaction_loss = None
    if track_losses and (loss_ring or best_window):
        # the last `loss_epochs` epochs up to the selected one (without a selection: the last
        # ones); rows never visited stay NaN
        window = best_window if best_window is not None and best_epoch >= 0 else list(loss_ring)
        del loss_ring, best_window
        if len(window) == 1:        # (the same values as the mean below, without its copies)
            interaction_loss = window[0][1].astype(np.float64)
            interaction_loss[~np.isfinite(interaction_loss)] = np.nan
        else:
            stack = np.stack([a for _, a in window])
            seen = np.isfinite(stack)
            interaction_loss = np.where(seen, stack, 0).sum(0) / np.maximum(seen.sum(0), 1)
            interaction_loss[~seen.any(0)] = np.nan
        del window
    model.eval()
    return TrainResult(task=task, history=history, best_epoch=best_epoch,
                       best_valid=sign * best if use_valid and best_state is not None else float("nan"),
                       interaction_loss=interaction_loss, checkpoints=checkpoints,
                       seconds=time.perf_counter() - t0, epochs_run=epoch + 1)


def _fit_closed_form(task: Task, valid, exclude, metric, eval_cfg, on_epoch, drop_rows=None) -> TrainResult:
    t0 = time.perf_counter()
    task.fit_closed_form(drop_rows=drop_rows)    # with drop_rows: refit exactly without them
    task.model.eval()
    record = {"epoch": 0, "train_loss": float("nan"), "epoch_seconds": time.perf_counter() - t0}
    best = float("nan")
    if valid is not None:
        best = record[f"valid_{metric}"] = validation_score(task.model, valid, exclude, metric, eval_cfg)
    if on_epoch is not None:
        on_epoch(record, task)
    loss = task.interaction_losses() if hasattr(task, "interaction_losses") else None
    return TrainResult(task=task, history=[record], best_epoch=0, best_valid=best,
                       interaction_loss=loss, seconds=time.perf_counter() - t0, epochs_run=1)


def training_rows(model_kind: str, rows: Interactions, keep) -> Interactions:
    """The rows ``keep`` selects, copied with only the per-row fields the model reads (its
    registered ``reads``: e.g. none for MF, ``timestamp`` for the LSTM): a retraining on 90% of
    a log copies 8 bytes a row (int32 user and item) instead of every field."""
    reads = MODELS.meta(model_kind).get("reads", ("rating", "timestamp"))
    return rows.only(reads).take(keep)


def train_model(model_cfg, train: Interactions, train_cfg, *, valid: Optional[Interactions] = None,
                eval_cfg=None, checkpoint_dir: Optional[str] = None, log_prefix: str = "",
                track_losses: bool = True) -> TrainResult:
    """Build and fit a model on ``train``, selecting on ``valid`` (training items excluded)."""
    task = build_task(model_cfg, train, train_cfg)
    return fit(task, train_cfg, valid=valid, exclude=[train], eval_cfg=eval_cfg,
               checkpoint_dir=checkpoint_dir, log_prefix=log_prefix, track_losses=track_losses)
