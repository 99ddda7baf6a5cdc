"""Base-model training through Ray Train (``TorchTrainer``, the Train V2 API of Ray 2.60).

Used when ``train.workers`` > 0 or ``train.use_gpu``. Every worker receives the whole training
set through the object store (the negative sampler, LightGCN's graph and the autoencoders'
user rows need all of it) and takes a deterministic shard (:func:`shard_rows`: rows
``rank::world``, or the rows of users ``rank::world``), so the same config trains on the same
shards whatever the order in which workers start; one worker reproduces the in-process run
exactly. Shards differ by at most one key, so DDP (``prepare_model``) runs each epoch inside
``Join``. Closed-form models fit on everything. Rank 0 reports a checkpoint (weights + learning
rate) every epoch; the final report carries the selected weights, the history and the
per-interaction losses gathered from every rank.

``train.shard: user`` makes the shards data-local for every model: the driver splits the rows
by user (:func:`shard_rows`) and puts each rank's rows in the object store on their own, so a
worker receives and builds from its shard only (its users' positives are all in it, so the
negative sampler stays exact); the whole set travels once, shared read-only, for excluding
training items during validation.

Why not ``get_dataset_shard``: Ray Data's streaming split hands blocks to whichever worker asks
first (shards are not reproducible) and, with ``equal=True``, drops the remainder rows.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import tempfile
from typing import Optional

import numpy as np

from ..core.data import Interactions
from ..core.train import TrainResult, build_task, fit

log = logging.getLogger("recval_ray")


def shard_rows(full: Interactions, shard_by: str, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank ``rank``'s training rows: rows ``rank::world`` (``shard_by="row"``) or all rows of
    users ``sorted(users)[rank::world]`` (``"user"``). Deterministic, disjoint, covering every
    row: the same config gives the same shards whatever order workers start in."""
    if shard_by == "user":
        keys = np.unique(full.user)[rank::world]
        return np.flatnonzero(np.isin(full.user, keys)), keys
    rows = np.arange(len(full), dtype=np.int64)[rank::world]
    return rows, rows


def _train_loop(config: dict) -> None:
    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    valid: Interactions = config["valid"]
    if "shards" in config:   # data-local: this rank gets its own users' rows only
        rows, local = ray.get(config["shards"][rank])
        full = ray.get(config["train"])           # shared read-only (zero-copy): exclusion only
    else:
        full = config["train"]
    train_cfg = config["train_cfg"]
    if config.get("device") == "cuda":
        train_cfg = dataclasses.replace(train_cfg, device=str(ray.train.torch.get_device()))
    else:
        train_cfg = dataclasses.replace(train_cfg, device="cpu")
    local_cfg = dataclasses.replace(train_cfg, batch_size=max(1, train_cfg.batch_size // world),
                                    seed=train_cfg.seed + rank)
    # identical initial weights on every rank (base seed); per-rank batch order (seed + rank)
    init_cfg = dataclasses.replace(local_cfg, seed=train_cfg.seed)
    if "shards" in config:
        task = build_task(config["model_cfg"], local, init_cfg)
        restricted = False
    elif config["shard_by"] == "user":
        rows, keys = shard_rows(full, config["shard_by"], rank, world)
        task = build_task(config["model_cfg"], full.take(rows), init_cfg)
        restricted = False
    else:   # the whole training set (sampler, graph), visiting this rank's rows
        rows, keys = shard_rows(full, config["shard_by"], rank, world)
        task = build_task(config["model_cfg"], full, init_cfg)
        restricted = world > 1 and not task.closed_form
        if restricted:
            task.restrict(rows)
        elif task.closed_form:
            rows = np.arange(len(full))
    epoch_context = None
    if world > 1 and not task.closed_form:  # DDP needs parameters that take gradients
        from torch.distributed.algorithms.join import Join
        task.module = ray.train.torch.prepare_model(task.model, move_to_device=False)
        # shards differ by at most one key, so ranks may run one batch more or less
        epoch_context = lambda: Join([task.module])  # noqa: E731

    def on_epoch(record: dict, task_) -> None:
        metrics = {k: v for k, v in record.items() if k != "checkpoint"}
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                torch.save({"epoch": record["epoch"], "lr": float(config["train_cfg"].lr),
                            "model": task_.model.state_dict()}, os.path.join(d, "model.pt"))
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)

    result = fit(task, local_cfg, valid=valid, exclude=[full], eval_cfg=config["eval_cfg"],
                 on_epoch=on_epoch, epoch_context=epoch_context,
                 track_losses=bool(config.get("track_losses", True)))
    loss = result.interaction_loss if result.interaction_loss is not None else np.full(len(rows), np.nan)
    if restricted:   # the task spans the whole training set: keep this rank's rows
        loss = loss[rows]
    parts = [(rows, loss, task.n_train)]
    if world > 1 and dist.is_initialized():
        parts = [None] * world
        dist.all_gather_object(parts, (rows, loss, task.n_train))
    final = {k: v for k, v in dataclasses.asdict(dataclasses.replace(result, task=None)).items()
             if k not in ("task", "interaction_loss", "checkpoints")}
    if rank == 0:
        merged = np.full(len(full), np.nan)
        for r, l, _ in parts:
            merged[r] = l
        final["rows_held"] = [int(n) for _, _, n in parts]     # the training rows each rank's task holds
        with tempfile.TemporaryDirectory() as d:
            torch.save({"model": task.model.state_dict(), "lr": float(config["train_cfg"].lr)},
                       os.path.join(d, "model.pt"))
            with open(os.path.join(d, "result.pkl"), "wb") as fh:
                pickle.dump({"summary": final, "interaction_loss": merged}, fh)
            ray.train.report({"final": 1, "best_epoch": result.best_epoch},
                             checkpoint=Checkpoint.from_directory(d))
    else:
        ray.train.report({"final": 1, "best_epoch": result.best_epoch})


def train_with_ray(cfg, train_part: Interactions, valid: Interactions, *, tag: str,
                   checkpoint_dir: Optional[str] = None, storage_path: Optional[str] = None,
                   track_losses: bool = True) -> TrainResult:
    """Fit ``cfg.model`` on ``train_part`` with a ``TorchTrainer``; returns the selected model
    (and, with ``track_losses``, every training row's loss)."""
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..registry import MODELS

    import ray

    workers = max(1, cfg.train.workers)
    use_gpu = bool(cfg.train.use_gpu)
    shard_by = (MODELS.get(cfg.model.kind).meta or {}).get("shard_by", "row")
    if cfg.train.shard == "user":
        shard_by = "user"
    loop_config = {"valid": valid, "train_cfg": cfg.train, "model_cfg": cfg.model, "eval_cfg": cfg.evaluate,
                   "shard_by": shard_by, "device": "cuda" if use_gpu else "cpu", "track_losses": track_losses}
    if cfg.train.shard == "user":
        # data-local shards: each rank receives only its users' rows through the object store;
        # the whole set is shared once, read-only, for excluding training items in validation
        loop_config["train"] = ray.put(train_part)
        loop_config["shards"] = [ray.put((rows, train_part.take(rows))) for rows in
                                 (shard_rows(train_part, "user", r, workers)[0] for r in range(workers))]
    else:
        loop_config["train"] = train_part
    storage_path = storage_path or checkpoint_dir or tempfile.mkdtemp(prefix="recval-train-")
    storage_path = os.path.abspath(storage_path) if "://" not in storage_path else storage_path
    storage_fs = None
    if storage_path.startswith("s3://"):
        from ..fs import resolve
        storage_fs, storage_path = resolve(storage_path, cfg.storage.endpoint_url, cfg.storage.region)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(name=f"{cfg.name}-{tag}", storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints or None)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "model.pt"), map_location="cpu", weights_only=False)
        with open(os.path.join(d, "result.pkl"), "rb") as fh:
            extra = pickle.load(fh)
    local_cfg = dataclasses.replace(cfg.train, device="cpu")
    task = build_task(cfg.model, train_part, local_cfg)
    task.model.load_state_dict(state["model"])
    task.model.eval()
    s = extra["summary"]
    return TrainResult(task=task, history=s["history"], best_epoch=s["best_epoch"], best_valid=s["best_valid"],
                       interaction_loss=extra["interaction_loss"], checkpoints=[storage_path],
                       seconds=s["seconds"], epochs_run=s["epochs_run"], rows_held=s.get("rows_held"))
