"""The recval job, one function per stage: ingest -> split (+ noise) -> train -> value ->
prune -> retrain and evaluate -> write.

The CLI, the tests and Tune trials call these same functions. Everything that can fail on bad
input (config, data, split) runs before anything is written; the run's ``manifest.json`` is
written last and only then is the run complete.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .schema import JobConfig
from .core.data import Dataset, Interactions, Split
from .core.evaluation import (drop_unseen, evaluate_ranking, exposure, noise_detection, sample_note,
                              sample_summary)
from .core.noise import inject_noise, natural_noise
from .core.text_types import TEXT_FORMATS, text_column_types, typed_text_columns
from .core.prune import dropped_profile, prune_valued, random_prune_mask
from .core.split import split_interactions
from .core.train import TrainResult, train_model, training_rows
from .profile import release_free_heap
from .core.valuers.base import Valuation, ValuationContext
from .registry import MODELS, VALUERS

log = logging.getLogger("recval_ray")
MAX_METRICS_TABLE_ROWS = 1000   # tables of a valuation up to this size are also copied into metrics.json


# ---------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------
def load_data(cfg: JobConfig, use_ray: bool = True) -> Dataset:
    """Ingest the job's data: Ray Data over the input files, or the same parsers in-process."""
    if use_ray and cfg.data.format != "synthetic":
        from .ray_layer.ingest import read_dataset
        return read_dataset(cfg.data, cfg.storage)
    from .core.ingest import load_dataset
    return load_dataset(cfg.data, cfg.storage)


def make_split(cfg: JobConfig, dataset: Dataset, release: bool = False) -> tuple[Split, list[str]]:
    """Split, inject noise into train (flagged ``is_noise``), drop unseen evaluation rows.
    ``release``: the dataset's rows are dropped as soon as the parts hold them
    (:meth:`~.core.data.Dataset.release_interactions`: the log is never held three times)."""
    n_rows = len(dataset.interactions)
    split = split_interactions(dataset.interactions, cfg.split, dataset.given_split)
    if release:
        dataset.release_interactions()
    if cfg.noise.kind == "natural":
        split = natural_noise(split, cfg.noise.natural.rating_at_most)
    else:
        split = inject_noise(split, cfg.noise.ratio, cfg.noise.seed)
    split, warnings = drop_unseen(split, strict=cfg.data.strict)
    for w in warnings:
        log.warning(w)
    from .errors import InputError
    for name, part in split.parts().items():
        if len(part) == 0 and (name != "valid" or cfg.split.plans_validation() is True):
            raise InputError(f"the {name} split is empty ({dataset.n_users} users, {n_rows} "
                             f"interactions, split {cfg.split.kind}): "
                             + ("nothing to train on" if name == "train" else
                                "nothing to evaluate on (every metric would be NaN)")
                             + "; a log needs users with several interactions each")
    return split, warnings


def spills(cfg: JobConfig, split: Split) -> bool:
    """Whether the run spills (``output.spill_rows``: from that many interactions; 0: never)."""
    rows = sum(len(p) for p in split.parts().values())
    return 0 < int(cfg.output.spill_rows) <= rows


def spill_columns(cfg: JobConfig, split: Split) -> Split:
    """The split with the per-row columns the model does not read while training (rating,
    timestamp, input row; :func:`~.core.spill.spillable_fields`) in memory-mapped temporary
    files: the valuers and writers read them from there; the trainer never sees them."""
    from .core.spill import spill_split, spillable_fields
    if cfg.output.spill_dir and not os.path.isdir(cfg.output.spill_dir):
        from .errors import ConfigError
        raise ConfigError(f"output.spill_dir: {cfg.output.spill_dir} is not a directory on this machine")
    fields = spillable_fields(MODELS.meta(cfg.model.kind).get("reads", ("rating", "timestamp")))
    before = sum(getattr(p, f).nbytes for p in split.parts().values() for f in fields if getattr(p, f) is not None)
    split = spill_split(split, fields, cfg.output.spill_dir)
    release_free_heap()
    log.info("memory: %s of %d rows (%.0f MB) spilled to memory-mapped temporary files until read",
             "/".join(fields), sum(len(p) for p in split.parts().values()), before / 2 ** 20)
    return split


def spill_values(cfg: JobConfig, valuation: Valuation) -> None:
    """The valuation's per-row values and method columns spilled (:func:`~.core.spill.spill`)."""
    from .core.spill import spill
    valuation.values = spill(valuation.values, cfg.output.spill_dir)
    valuation.columns = {k: spill(np.asarray(v), cfg.output.spill_dir) for k, v in valuation.columns.items()}
    release_free_heap()


def preflight(cfg: JobConfig, split: Split) -> None:
    """Before training: a method that registered ``peak_bytes`` has its estimated peak memory
    for these data checked against ``valuation.resources.memory_gb`` (or the memory available),
    so a too-large job fails in seconds with what to lower, not after training."""
    from .core.valuers.base import DataSize, check_memory
    from .registry import VALUERS
    estimate = VALUERS.meta(cfg.valuation.method).get("peak_bytes")
    resources = getattr(cfg.valuation, "resources", None)
    if estimate is None or resources is None:
        return
    need, why = estimate(cfg, DataSize(split.train.n_users, split.train.n_items, len(split.train)))
    budget = check_memory(cfg.valuation.method, int(need), why, resources)
    log.info("%s: estimated peak %.2f GiB of %s GiB", cfg.valuation.method, need / 2 ** 30,
             f"{budget / 2 ** 30:.1f}" if budget else "unknown")


def train(cfg: JobConfig, train_part: Interactions, valid: Interactions, *, tag: str,
          checkpoint_dir: Optional[str] = None, storage_path: Optional[str] = None,
          on_epoch: Optional[Callable] = None, track_losses: bool = True) -> TrainResult:
    """Train ``model.kind`` on ``train_part``: in-process, or on Ray Train when asked for
    (``storage_path``: where Ray Train keeps its per-epoch checkpoints, e.g. the run's storage).
    ``on_epoch(record, task)``: the trainer's per-epoch hook (in-process training only; Tune
    trials report there). ``track_losses``: record every training row's loss (the base model,
    whose losses loss valuers read); retrainings and fold models skip it (memory and time)."""
    if cfg.train.workers > 0 or cfg.train.use_gpu:
        if on_epoch is not None:
            raise ValueError("train: on_epoch needs in-process training (train.workers 0, no use_gpu)")
        from .ray_layer.train import train_with_ray
        return train_with_ray(cfg, train_part, valid, tag=tag, checkpoint_dir=checkpoint_dir,
                              storage_path=storage_path, track_losses=track_losses)
    if on_epoch is not None:
        from .core.train import build_task, fit
        return fit(build_task(cfg.model, train_part, cfg.train), cfg.train, valid=valid, exclude=[train_part],
                   eval_cfg=cfg.evaluate, checkpoint_dir=checkpoint_dir, on_epoch=on_epoch,
                   log_prefix=f"[{tag}] ", track_losses=track_losses)
    return train_model(cfg.model, train_part, cfg.train, valid=valid, eval_cfg=cfg.evaluate,
                       checkpoint_dir=checkpoint_dir, log_prefix=f"[{tag}] ", track_losses=track_losses)


def release_hooks(use_ray: bool) -> tuple:
    """What the profiler calls between stages to free memory the driver no longer needs."""
    if not use_ray:
        return ()
    from .ray_layer.object_store import release_object_store_pages
    return (release_object_store_pages,)


def make_executor(cfg: JobConfig, use_ray: bool):
    """Ray actors for a valuer's work items when it has some (``work_items`` at registration),
    ``valuation.resources.actors`` > 0 and Ray is on."""
    from .registry import VALUERS
    res = getattr(cfg.valuation, "resources", None)
    n = int(res.actors) if res is not None and VALUERS.meta(cfg.valuation.method).get("work_items") else 0
    if not use_ray or n <= 0:
        return None
    from .ray_layer.actors import ActorPoolExecutor
    return ActorPoolExecutor(n, res.cpus, res.gpus or 0.0)


def verdict_executor(cfg: JobConfig, use_ray: bool):
    """Ray actors for the verdict's retrainings (``verdict.actors`` > 0, on Ray, in-process
    training), else None (the driver)."""
    n = int(cfg.verdict.actors)
    if not use_ray or n <= 0 or cfg.train.workers > 0 or cfg.train.use_gpu:
        return None
    from .ray_layer.actors import ActorPoolExecutor
    return ActorPoolExecutor(n, cfg.verdict.cpus, 0.0)


def value(cfg: JobConfig, split: Split, base: TrainResult, dataset: Dataset,
          work_dir: Optional[str] = None, executor=None, store=None, use_ray: bool = False) -> Valuation:
    """Value the training data with ``valuation.method``; ``store`` keeps finished work items
    so an interrupted run resumes; ``use_ray``: the job runs on Ray (valuers may use it)."""
    entry = VALUERS.get(cfg.valuation.method)
    valuer = entry.factory(cfg.valuation)
    ctx = ValuationContext(split=split, base=base, model_cfg=cfg.model, train_cfg=cfg.train,
                           eval_cfg=cfg.evaluate, seed=cfg.train.seed, executor=executor,
                           work_dir=work_dir, dataset=dataset, store=store, distributed=_ports(use_ray),
                           progress=log.info)
    t0 = time.perf_counter()
    if coverage(cfg) == "all":
        valuation = crossfit_valuation(cfg, split, valuer)
    else:
        valuation = valuer.value(ctx)
    valuation.info.setdefault("seconds", time.perf_counter() - t0)
    if len(valuation.values) != len(split.train):
        raise RuntimeError(f"valuer {cfg.valuation.method} returned {len(valuation.values)} values "
                           f"for {len(split.train)} training interactions")
    return valuation


def coverage(cfg: JobConfig) -> str:
    """``train`` or ``all``: which rows the run values (``valuation.coverage``, ``auto``
    resolved by :func:`~.core.crossfit.resolve_coverage`)."""
    from .core.crossfit import resolve_coverage
    asked = getattr(cfg.valuation, "coverage", "train")
    can = VALUERS.get(cfg.valuation.method).factory(cfg.valuation).crossfits and \
        "bpr" in MODELS.meta(cfg.model.kind).get("capabilities", ())
    noise = cfg.noise.ratio if cfg.noise.kind == "injected" else 1.0     # natural noise: a benchmark protocol
    return resolve_coverage(asked, cfg.data.format, noise, cfg.split.kind, can)


def crossfit_valuation(cfg: JobConfig, split: Split, valuer) -> Valuation:
    """``valuation.coverage: all``: every row of every split valued by the fold model trained
    without it (:mod:`~.core.crossfit`); the valuation's ``values`` are the training rows',
    ``whole_log`` holds the validation and test rows' and every row's fold."""
    from .core.crossfit import PARTS, crossfit
    folds = int(cfg.valuation.folds)
    log.info("cross-fitting %s over %d folds: every row valued by a model trained without it",
             cfg.valuation.method, folds)
    stat, whole = crossfit(
        split, folds, cfg.train.seed,
        train_fn=lambda tr, va, tag: train(cfg, tr, va, tag=tag, track_losses=False),
        statistic=lambda res, rows, seed: valuer.heldout_statistic(res, rows, seed, cfg.train),
        progress=log.info)
    whole.statistic = np.concatenate([stat[p] for p in PARTS])
    return revalue_whole_log(cfg.valuation.method, valuer, whole, split)


def revalue_whole_log(method: str, valuer, whole, split: Split) -> Valuation:
    """The :class:`Valuation` of ``valuer`` from a cross-fitted statistic (``whole.statistic``):
    values of every row; the training rows' are the valuation's ``values``."""
    from .core.crossfit import all_rows
    from .core.valuers.base import MethodInfo
    values, columns = valuer.crossfit_values(whole.statistic, all_rows(split))
    whole = whole.revalue(values, columns)
    n = len(split.train)
    return Valuation(method=method, values=values[:n], columns={k: v[:n] for k, v in columns.items()},
                     info=MethodInfo(seconds=whole.seconds), whole_log=whole)


def candidate_valuations(cfg: JobConfig, split: Split, base: TrainResult, dataset: Dataset,
                         valuation: Valuation, use_ray: bool) -> list[tuple[str, Valuation]]:
    """The valuations the verdict prunes by (:func:`~.schema.verdict_methods`): the run's own
    first, then each other method valued the way the run was (a cross-fitted run re-values its
    held-out statistic when the method can, without training again; else the method values the
    training rows from the base model). Needs the base model's training data (before release)."""
    from .schema import verdict_methods
    out = [(cfg.valuation.method, valuation)]
    for label, opts in verdict_methods(cfg)[1:]:
        valuer = VALUERS.get(opts.method).factory(opts)
        if valuation.whole_log is not None and valuer.crossfits:
            other = revalue_whole_log(opts.method, valuer, valuation.whole_log, split)
        else:
            if hasattr(opts, "coverage"):
                opts = dataclasses.replace(opts, coverage="train")
            other = value(dataclasses.replace(cfg, valuation=opts), split, base, dataset, use_ray=use_ray)
        log.info("verdict: %s valued the data as a candidate too", label)
        out.append((label, other))
    return out


def _ports(use_ray: bool):
    """The Ray layer's :class:`~recval_ray.core.ports.Distributed` port when the job runs on Ray."""
    if not use_ray:
        return None
    from .ray_layer.ports import RayPorts
    return RayPorts()


@dataclass
class PruneOutcome:
    keep: np.ndarray
    random_keep: Optional[np.ndarray]
    metrics: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    base_metrics: Optional[dict] = None     # the base model on the same test rows (entity pruning)
    test_rows_left_out: int = 0
    evaluation: Optional[dict] = None       # the user sample of those test rows (evaluate.sample_users)
    exposure: dict = field(default_factory=dict)   # beyond-accuracy figures of each retrained model
    keep_all: Optional[np.ndarray] = None   # valuation.coverage: all: kept rows of train, valid, test


def prune_and_retrain(cfg: JobConfig, split: Split, valuation: Valuation, work_dir: str,
                      base_model=None) -> PruneOutcome:
    """Drop the lowest-valued interactions, retrain on the rest and on a random control.

    All models are evaluated on the same test set with the same excluded items (the full
    training set, injected noise included, and the validation set), so only the training
    data differ.
    """
    keep, random_keep, keep_all = prune_masks(cfg, split, valuation)
    out = PruneOutcome(keep=keep, random_keep=random_keep, keep_all=keep_all)
    if not cfg.prune.retrain or cfg.prune.strategy == "none":
        return out
    target = split
    extra: list = []
    if cfg.prune.scope == "entity" and valuation.row_entity is not None:
        # a removed user (item, group) has no training data left: its own test rows would
        # measure the removal of its data, not what the rest gain. Every model, the base one
        # included, is evaluated without the test rows of the entities either variant removed.
        if valuation.test_entity is not None:
            test_entity = valuation.test_entity
        elif valuation.entity_kind in ("user", "item"):
            test_entity = getattr(split.test, valuation.entity_kind)
        else:
            raise ValueError(f"prune.scope: entity: the valuation gives no entity of the test rows "
                             f"({valuation.entity_kind})")
        dropped = ~keep if random_keep is None else (~keep | ~random_keep)
        removed = np.unique(valuation.row_entity[dropped])
        removed = removed[removed >= 0]
        test_keep = ~np.isin(test_entity, removed)
        target = Split(split.train, split.valid, split.test.take(test_keep))
        out.test_rows_left_out = int((~test_keep).sum())
        out.evaluation = sample_summary(cfg.evaluate, target)
        if valuation.entity_kind == "item" and valuation.drop_removed_items:
            # removed items also leave every model's candidates: the base model would otherwise
            # waste top-K slots on them
            n_u = split.train.n_users
            extra = [Interactions(np.repeat(np.arange(n_u), len(removed)), np.tile(removed, n_u),
                                  n_u, split.train.n_items)]
        out.base_metrics = evaluate_ranking(base_model, target, cfg.evaluate, "test",
                                            exclude=[split.train, split.valid] + extra) \
            if base_model is not None else None
    for tag, mask in (("pruned", keep), ("random_pruned", random_keep)):
        if mask is None:
            continue
        def exposure_of(res, kept, tag=tag):
            if not extra and target is split and not getattr(res.model, "explicit", False):
                out.exposure[tag] = exposure(res.model, split, cfg.evaluate, item_popularity(split),
                                             context=[kept, split.valid])
        out.metrics[tag], res = retrain_and_evaluate(cfg, split, mask, tag=tag, target=target, extra_exclude=extra,
                                                     then=exposure_of)
        out.training[tag] = training_summary(res)
        del res                                    # one retrained model at a time
        release_free_heap()                        # its freed arrays back to the system before the next
    return out


def prune_masks(cfg: JobConfig, split: Split, valuation: Valuation, random_control: Optional[bool] = None
                ) -> tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """(kept rows, kept rows of the random control dropping as many or None, kept rows of the
    whole log or None): the masks over ``split.train`` that ``prune`` selects from ``valuation``
    (:func:`~.core.prune.prune_valued`: over the whole log when it was cross-fitted); the
    control is drawn with seed ``prune.seed + 1`` when ``random_control`` (default
    ``prune.random_control``)."""
    keep, keep_all = prune_valued(valuation, split, cfg.prune)
    if random_control is None:
        random_control = cfg.prune.random_control
    random_keep = random_prune_mask(keep, split.train, cfg.prune, cfg.prune.seed + 1,
                                    groups=valuation.row_entity, values=valuation.values) \
        if random_control else None
    return keep, random_keep, keep_all


def retrain_and_evaluate(cfg: JobConfig, split: Split, mask: np.ndarray, *, tag: str,
                         target: Optional[Split] = None, extra_exclude: Optional[list] = None,
                         on_epoch: Optional[Callable] = None, then: Optional[Callable] = None
                         ) -> tuple[dict, TrainResult]:
    """``then(result, kept rows)``: called after the evaluation, with the kept rows still held
    (no second copy of them for what else reads them).

    Train on the training rows ``mask`` keeps (selecting on validation) and evaluate on the
    test part of ``target`` (default ``split``). Excluded items stay the full training set and
    the validation set (plus ``extra_exclude``), so every variant is ranked against the same
    candidates; context models
    read the kept rows (+ validation) as the users' histories."""
    kept = training_rows(cfg.model.kind, split.train, mask)
    res = train(cfg, kept, split.valid, tag=tag, on_epoch=on_epoch, track_losses=False)
    if res.task is not None:
        res.task.release_data()      # the model only scores from here on: its sampler and batches go
    metrics = evaluate_ranking(res.model, target if target is not None else split, cfg.evaluate, "test",
                               exclude=[split.train, split.valid] + list(extra_exclude or []),
                               context=[kept, split.valid])
    if then is not None:
        then(res, kept)
    return metrics, res


def dropped_profile_table(dataset: Dataset, split: Split, keep: np.ndarray,
                          keep_all: Optional[np.ndarray] = None) -> pa.Table:
    """:func:`~.core.prune.dropped_profile` of the run's pruning (of the whole log when it was
    valued: ``keep_all``), the top users and items named by their original ids."""
    if keep_all is not None:
        from .core.crossfit import all_rows
        prof = dropped_profile(all_rows(split), keep_all)
    else:
        prof = dropped_profile(split.train, keep)
    facet = np.asarray(prof["facet"], dtype=object)
    group = np.asarray(prof["group"], dtype=object)
    for name, original in (("top_user", dataset.original_users), ("top_item", dataset.original_items)):
        at = np.flatnonzero(facet == name)
        if len(at):
            codes = np.asarray([int(g) for g in group[at]], dtype=np.int64)
            group[at] = [str(x) for x in original(codes).to_pylist()]
    prof["group"] = list(group)
    return pa.table(prof)




def output_text_types(cfg: JobConfig, dataset: Dataset, use_ray: bool) -> dict:
    """The column types a CSV/TSV input's pass-through outputs (``pruned/``, ``keep/``,
    ``drop/``) get, decided once per run over the whole input: from the source table, or in
    one Ray Data pass over a streamed input. Empty for typed inputs."""
    if cfg.data.format not in TEXT_FORMATS:
        return {}
    if dataset.stream is not None and use_ray:
        from .ray_layer.tables import stream_text_types
        return stream_text_types(dataset)
    return text_column_types(dataset.source) if dataset.source is not None else {}


def dropped_source_rows(split: Split, keep: np.ndarray, keep_all: Optional[np.ndarray] = None
                        ) -> Optional[np.ndarray]:
    """The input rows (``Dataset.source`` row numbers) the run drops: the training rows the
    pruning removed or, when the whole log was valued (``keep_all``), the rows of any split it
    removed; injected rows are not input rows. None when rows cannot be traced to the input."""
    if split.train.source_row is None:
        return None
    if keep_all is None:
        rows = split.train.source_row[~np.asarray(keep, dtype=bool)]
    else:
        parts = [split.train, split.valid, split.test]
        if any(p.source_row is None for p in parts if len(p)):
            return None
        src = np.concatenate([p.source_row if p.source_row is not None else np.full(len(p), -1) for p in parts])
        rows = src[~np.asarray(keep_all, dtype=bool)]
    return rows[rows >= 0]


def keep_drop_masks(dataset: Dataset, split: Split, keep: np.ndarray,
                    keep_all: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """Over the input's rows (``Dataset.source``): True where the run drops the row
    (:func:`dropped_source_rows`). None without a source table."""
    rows = dropped_source_rows(split, keep, keep_all) if dataset.source is not None else None
    if rows is None:
        return None
    drop = np.zeros(dataset.source.num_rows, dtype=bool)
    drop[rows] = True
    return drop


def write_keep_drop(out, dataset: Dataset, split: Split, keep: np.ndarray, use_ray: bool,
                    types: dict, keep_all: Optional[np.ndarray] = None) -> Optional[dict]:
    """``drop/``: the input rows the pruning removes (training rows, or rows of every split
    when the whole log was valued: ``keep_all``); ``keep/``: every other input row (all splits,
    and rows ingestion set aside, e.g. repeated pairs): the cleaned log. The input's own
    columns, names and order, nothing added; a CSV/TSV input's columns typed as a reader would
    (``types``: :func:`output_text_types`). A streamed input is filtered by Ray Data end to
    end. Returns the counts, or None when the rows cannot be traced to the input."""
    if dataset.stream is not None and use_ray:
        rows = dropped_source_rows(split, keep, keep_all)
        if rows is None:
            return None
        from .ray_layer.tables import write_keep_drop as write_streamed
        return write_streamed(out, dataset, rows, types)
    drop = keep_drop_masks(dataset, split, keep, keep_all)
    if drop is None:
        return None
    src = typed_text_columns(dataset.source, types)
    mask = pa.array(drop)
    out.write_table("drop", src.filter(mask), use_ray=use_ray)
    out.write_table("keep", src.filter(pc.invert(mask)), use_ray=use_ray)
    return {"input_rows": int(len(drop)), "drop": int(drop.sum()), "keep": int(len(drop) - drop.sum())}


def item_popularity(split: Split) -> np.ndarray:
    """Training interactions per item (the whole training set, as every model's candidates)."""
    return split.train.item_counts()


def training_summary(res: TrainResult) -> dict:
    out = {"best_epoch": res.best_epoch, "epochs_run": res.epochs_run, "best_valid": res.best_valid,
           "seconds": round(res.seconds, 3), "seconds_per_epoch": round(res.seconds / max(1, res.epochs_run), 4)}
    if res.rows_held is not None:
        out["rows_held_per_worker"] = res.rows_held
    return out


# ---------------------------------------------------------------------------------------
# output tables
# ---------------------------------------------------------------------------------------
def interactions_table(dataset: Dataset, part: Interactions, extra: Optional[dict] = None) -> pa.Table:
    """Original ids (and rating/timestamp when present) of ``part``, plus ``extra`` columns."""
    cols = {"user_id": dataset.original_users(part.user), "item_id": dataset.original_items(part.item)}
    if part.rating is not None:
        cols["rating"] = dataset.original_ratings(part)
    if part.timestamp is not None:
        cols["timestamp"] = pa.array(part.timestamp, pa.int64(), mask=part.timestamp < 0)
    if part.is_noise is not None:
        cols["is_noise"] = pa.array(part.is_noise)
    for k, v in (extra or {}).items():
        cols[k] = pa.array(v)
    return pa.table(cols)


def valued_rows(split: Split, valuation: Valuation, keep: np.ndarray,
                keep_all: Optional[np.ndarray] = None) -> tuple[Interactions, dict]:
    """The rows ``values/`` holds and their columns (value, method columns, kept): the
    training rows or, when the whole log was valued (``valuation.coverage: all``), every row of
    train, valid and test with its ``split`` (code into :data:`~.core.crossfit.PARTS`) and
    ``fold``."""
    whole = valuation.whole_log
    if whole is None:
        return split.train, {"value": valuation.values, **valuation.columns, "kept": keep}
    from .core.crossfit import PARTS, all_rows
    rows = all_rows(split)
    cols = {"value": np.concatenate([whole.parts[p].values for p in PARTS])}
    cols.update({k: np.concatenate([whole.parts[p].columns[k] for p in PARTS]) for k in valuation.columns})
    cols["kept"] = keep_all if keep_all is not None else np.ones(len(rows), dtype=bool)
    cols["split"] = np.repeat(np.arange(len(PARTS), dtype=np.int8), [len(getattr(split, p)) for p in PARTS])
    cols["fold"] = np.concatenate([whole.parts[p].fold for p in PARTS])
    return rows, cols


def values_table(dataset: Dataset, split: Split, valuation: Valuation, keep: np.ndarray,
                 rows: Optional[np.ndarray] = None, keep_all: Optional[np.ndarray] = None,
                 valued: Optional[tuple] = None) -> pa.Table:
    """The valued-data schema: user_id, item_id, value, <method columns>, kept, [split, fold
    when the whole log was valued], rating, timestamp, is_noise (``rows``: only those rows of
    :func:`valued_rows`, for chunked writing; ``valued``: its result, computed once)."""
    from .core.crossfit import PARTS, SET_ASIDE
    part, cols = valued if valued is not None else valued_rows(split, valuation, keep, keep_all)
    if rows is not None:
        part, cols = part.take(rows), {k: np.asarray(v)[rows] for k, v in cols.items()}
    cols = dict(cols)
    code = cols.pop("split", None)
    t = interactions_table(dataset, part, cols)
    whole = []
    if code is not None:
        t = t.append_column("split", pa.DictionaryArray.from_arrays(pa.array(code, pa.int8()),
                                                                    pa.array(PARTS + (SET_ASIDE,))))
        whole = ["split", "fold"]
    order = ["user_id", "item_id", "value"] + list(valuation.columns) + ["kept"] + whole + \
        [c for c in ("rating", "timestamp", "is_noise") if c in t.column_names]
    return t.select(order)


TEXT_BYTES_PER_ROW = 32


def small_stream_on_driver(cfg: JobConfig, dataset: Dataset, use_ray: bool) -> Dataset:
    """A streamed input of at most ``output.ray_write_rows`` rows read once onto the driver as
    ``source``: its pass-through outputs are then filtered and written here, as for a small
    in-process input, instead of one Ray Data pass over the input per output (seconds each,
    tens of seconds on a cluster). Larger inputs stay streamed."""
    plan = dataset.stream
    if plan is None or not use_ray:
        return dataset
    limit = cfg.output.ray_write_rows
    if plan.counts:               # Parquet: the footers' row counts
        small = sum(plan.counts) <= limit
    else:                         # text: its bytes (at most TEXT_BYTES_PER_ROW per row allowed)
        import pyarrow.fs as pafs
        fs = plan.fs if plan.fs is not None else pafs.LocalFileSystem()
        small = sum(i.size for i in fs.get_file_info(list(plan.paths))) <= TEXT_BYTES_PER_ROW * limit
    if not small:
        return dataset
    from .ray_layer.tables import input_table
    source = input_table(dataset)
    return dataclasses.replace(dataset, source=source, stream=None)


def set_aside_positions(dataset: Dataset, split: Split, use_ray: bool) -> Optional[np.ndarray]:
    """Input rows (positions in the input) that no split holds: repeated pairs ingestion left
    out, validation/test rows whose user or item has no training row, rows below
    ``data.min_user`` / ``min_item``. None when rows cannot be traced to the input."""
    parts = [split.train, split.valid, split.test]
    if any(p.source_row is None for p in parts if len(p)):
        return None
    if dataset.source is not None:
        n_input = dataset.source.num_rows
    elif dataset.stream is not None and use_ray:
        plan = dataset.stream
        n_input = sum(plan.counts) if plan.counts else plan.read().count()
    else:
        return None
    held = np.ones(n_input, dtype=bool)
    for p in parts:
        if len(p):
            r = p.source_row
            held[r[r >= 0]] = False
    return np.flatnonzero(held)


def set_aside_table(dataset: Dataset, split: Split, like: pa.Schema, use_ray: bool) -> Optional[pa.Table]:
    """The rows of ``values/`` (schema ``like``) for the input rows no split holds
    (:func:`set_aside_positions`), so a whole-log ``values/`` has one row per input row: their
    ids, no value (null), ``kept`` (they stay in ``keep/``), ``split`` ``set-aside``, fold -1."""
    from .core.crossfit import PARTS, SET_ASIDE
    at = set_aside_positions(dataset, split, use_ray)
    if at is None or not len(at):
        return None
    ucol, icol = dataset.columns["user"], dataset.columns["item"]
    if dataset.source is not None:
        ids = dataset.source.select([ucol, icol]).take(pa.array(at))
    else:
        from .ray_layer.tables import read_input_rows
        ids = read_input_rows(dataset, at, [ucol, icol])
    n = ids.num_rows
    cols = {}
    for f in like:
        if f.name == "user_id":
            cols[f.name] = ids.column(ucol).cast(f.type)
        elif f.name == "item_id":
            cols[f.name] = ids.column(icol).cast(f.type)
        elif f.name == "kept":
            cols[f.name] = pa.array(np.ones(n, dtype=bool))
        elif f.name == "is_noise":
            cols[f.name] = pa.array(np.zeros(n, dtype=bool))
        elif f.name == "fold":
            cols[f.name] = pa.array(np.full(n, -1, dtype=np.int8))
        elif f.name == "split":
            cols[f.name] = pa.DictionaryArray.from_arrays(pa.array(np.full(n, len(PARTS), dtype=np.int8)),
                                                          pa.array(PARTS + (SET_ASIDE,)))
        else:
            cols[f.name] = pa.nulls(n, f.type)
    return pa.table(cols, schema=like)


def pruned_table(dataset: Dataset, kept: Interactions, noise_column: bool = True) -> pa.Table:
    """The kept interactions with the input's own columns and ids, in the input's order, then
    the injected ones (ids only): the same rows, in the same order, as the streamed
    pass-through writes (:mod:`recval_ray.ray_layer.tables`). ``is_noise`` is added only with
    ``noise_column`` (the run flagged some training rows as noise)."""
    src = dataset.source
    if src is None:
        return interactions_table(dataset, kept)
    if kept.source_row is not None:
        kept = kept.take(np.argsort(np.where(kept.source_row >= 0, kept.source_row, np.iinfo(np.int64).max),
                                    kind="stable"))
    rows = kept.source_row if kept.source_row is not None else np.arange(len(kept))
    real = rows >= 0
    cols = {}
    ucol, icol = dataset.columns.get("user") or "user_id", dataset.columns.get("item") or "item_id"
    for name in src.column_names:
        col = src.column(name)
        taken = col.take(pa.array(np.where(real, rows, 0)))
        if name == ucol:
            taken = dataset.original_users(kept.user).cast(col.type)
        elif name == icol:
            taken = dataset.original_items(kept.item).cast(col.type)
        elif not real.all():
            taken = pa.array(taken.to_pylist(), type=col.type, mask=~real) if len(taken) else taken
        cols[name] = taken
    if kept.is_noise is not None and noise_column:
        cols["is_noise"] = pa.array(kept.is_noise)
    return pa.table(cols)


# ---------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------
@dataclass
class RunResult:
    uri: str
    run_id: str
    metrics: dict
    manifest: dict
    values: Optional[pa.Table] = None


def open_run(cfg: JobConfig, run_id: str, output_uri: Optional[str], overwrite: Optional[bool],
             use_ray: bool, address: Optional[str], public_uri: Optional[str] = None):
    """``(RunOutput, on_cluster)``: the run's output opened (checked writable, locked, a complete
    run refused without ``overwrite``: :meth:`~recval_ray.output.RunOutput.open`) before any
    work, and Ray started or joined. On a cluster, workers on other nodes cannot see this
    machine's temp dir, so Ray Train checkpoints go to the run's own storage (``on_cluster``).
    Use the output as a context manager: a failure aborts the attempt and releases the lock."""
    from .output import RunOutput
    out = RunOutput(output_uri or cfg.output.uri, run_id, cfg.storage, public_uri=public_uri,
                    ray_write_rows=cfg.output.ray_write_rows)
    out.open(cfg.output.overwrite if overwrite is None else overwrite)
    on_cluster = False
    if use_ray:
        import os
        from .ray_layer.session import ensure_ray
        try:
            ensure_ray(cfg.ray, address)
        except BaseException:
            out.abort()
            raise
        on_cluster = bool(address or cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    return out, on_cluster


def run_job(cfg: JobConfig, *, run_id: Optional[str] = None, output_uri: Optional[str] = None,
            overwrite: Optional[bool] = None, use_ray: bool = True, address: Optional[str] = None,
            public_uri: Optional[str] = None) -> RunResult:
    """Run the whole job; returns where the outputs are and the headline metrics.
    ``public_uri``: the run's address for its manifest when it is written inside another
    run's attempt (a sweep's best run). Every stage is profiled (``metrics["profile"]``)."""
    from .profile import Profiler
    timings: dict = {}
    t_all = time.perf_counter()
    run_id = run_id or cfg.output.run_id or cfg.name
    out, on_cluster = open_run(cfg, run_id, output_uri, overwrite, use_ray, address, public_uri)
    prof = Profiler(release=release_hooks(use_ray))
    try:
        with out:
            with prof.stage("ingest") as st:
                dataset = load_data(cfg, use_ray=use_ray)
                st.rows = len(dataset.interactions)
            with prof.stage("split", rows=len(dataset.interactions)):
                split, split_warnings = make_split(cfg, dataset, release=True)   # the split holds every row now
                spilling = spills(cfg, split)
                if spilling:
                    split = spill_columns(cfg, split)
            log.info("data: %d users, %d items; train %d (noise %d), valid %d, test %d",
                     dataset.n_users, dataset.n_items, len(split.train),
                     int(split.train.is_noise.sum()) if split.train.is_noise is not None else 0,
                     len(split.valid), len(split.test))
            preflight(cfg, split)

            work_dir = tempfile.mkdtemp(prefix=f"recval-{run_id}-")
            try:
                with prof.stage("train", rows=len(split.train)):
                    log.info("training the base %s model (up to %d epochs, selecting on validation %s)",
                             cfg.model.kind, cfg.train.epochs, cfg.train.select_metric)
                    base = train(cfg, split.train, split.valid, tag="base",
                                 checkpoint_dir=f"{work_dir}/checkpoints/base",
                                 storage_path=out.attempt_uri("checkpoints")
                                 if (cfg.output.checkpoints or on_cluster) else None)
                    if cfg.output.checkpoints:
                        out.upload_files(base.checkpoints, "checkpoints/base")
                    base_metrics = evaluate_ranking(base.model, split, cfg.evaluate, "test")
                    base_exposure = None if getattr(base.model, "explicit", False) else \
                        exposure(base.model, split, cfg.evaluate, item_popularity(split))

                with prof.stage("value", rows=len(split.train)):
                    log.info("valuing %d training interactions with %s", len(split.train), cfg.valuation.method)
                    valuation = value(cfg, split, base, dataset, work_dir=work_dir,
                                      executor=make_executor(cfg, use_ray), store=out.work_store(),
                                      use_ray=use_ray)
                    candidates = candidate_valuations(cfg, split, base, dataset, valuation, use_ray) \
                        if cfg.verdict.enabled else []
                    base.task.release_data()       # the base model only scores from here on
                    base.interaction_loss = None   # (read by the valuers only: 8 bytes a training row)
                    if spilling:                   # read again by the prune step and the writers only
                        spill_values(cfg, valuation)

                with prof.stage("prune+retrain", rows=len(split.train)):
                    log.info("pruning (%s, %s) and retraining on the kept data%s", cfg.prune.strategy,
                             cfg.prune.scope, " and on a random control" if cfg.prune.random_control else "")
                    pruned = prune_and_retrain(cfg, split, valuation, work_dir, base_model=base.model)
                    if pruned.base_metrics is not None:
                        base_metrics = pruned.base_metrics
                verdict = None
                if cfg.verdict.enabled:
                    with prof.stage("verdict", rows=len(split.train)):
                        from .decision import verdict as decide_verdict
                        log.info("verdict: retraining up to %d candidate prunings (%s), deciding on validation",
                                 len(candidates) * len(cfg.verdict.fractions) * len(cfg.verdict.scopes),
                                 ", ".join(label for label, _ in candidates))
                        verdict = decide_verdict(cfg, split, candidates, base, train, verdict_executor(cfg, use_ray))
                checks = None
                if cfg.checks.enabled():
                    with prof.stage("checks", rows=len(split.train)):
                        from .checks import checks_executor, run_checks
                        checked = candidates if candidates else [(cfg.valuation.method, valuation)]
                        checks = run_checks(cfg, split, checked, checks_executor(cfg, use_ray),
                                            base_epochs=base.best_epoch + 1 if base.best_epoch >= 0 else None)
            finally:
                shutil.rmtree(work_dir, ignore_errors=True)

            with prof.stage("summarise", rows=len(split.train)):   # metrics, dropped profile, examples
                metrics = build_metrics(cfg, dataset, split, base, base_metrics, valuation, pruned, split_warnings)
                if verdict is not None:
                    metrics["verdict"] = verdict
                if checks is not None:
                    metrics["checks"] = checks
                if base_exposure is not None:
                    metrics["exposure"] = {"base": base_exposure} | pruned.exposure
                profile_tab = dropped_profile_table(dataset, split, pruned.keep, pruned.keep_all) \
                    if (~(pruned.keep if pruned.keep_all is None else pruned.keep_all)).any() else None
                if profile_tab is not None:
                    metrics["dropped_profile"] = profile_tab.to_pylist()
                examples = why_examples(cfg, dataset, split, base)
                if examples:
                    metrics["why_examples"] = examples
                explanation = explain(cfg, split, dataset, valuation, metrics, timings)
                dataset = small_stream_on_driver(cfg, dataset, use_ray)
                n_valued = len(split.train) + (len(split.valid) + len(split.test) if valuation.whole_log else 0)
                values_tab = values_table(dataset, split, valuation, pruned.keep, keep_all=pruned.keep_all) \
                    if n_valued <= CHUNK_ROWS else None
                if values_tab is not None and valuation.whole_log is not None:
                    extra_rows = set_aside_table(dataset, split, values_tab.schema, use_ray)
                    if extra_rows is not None:      # one row per input row: the set-aside ones unvalued
                        values_tab = pa.concat_tables([values_tab, extra_rows])

            with prof.stage("write", rows=len(split.train) + len(split.valid) + len(split.test)):
                log.info("writing outputs to %s", out.uri)
                types = output_text_types(cfg, dataset, use_ray)
                write_outputs(out, cfg, dataset, split, valuation, pruned, values_tab, use_ray, types)
                if profile_tab is not None:
                    out.write_table("dropped_profile", profile_tab, use_ray=use_ray)
                counts = write_keep_drop(out, dataset, split, pruned.keep, use_ray, types, pruned.keep_all)
                if counts is not None:
                    metrics["keep_drop"] = counts
                    if valuation.whole_log is not None:
                        injected = metrics["data"]["injected_noise"] if cfg.noise.kind == "injected" else 0
                        valued = sum(metrics["coverage"]["rows_valued"].values()) - injected
                        metrics["coverage"]["input_rows"] = counts["input_rows"]
                        metrics["coverage"]["input_rows_not_valued"] = counts["input_rows"] - valued
                        metrics["coverage"]["not_valued_why"] = (
                            "rows set aside before valuation (validation/test rows whose user or item has no "
                            "training row, repeated pairs, users or items below data.min_user/min_item); "
                            "they stay in keep/")
                if verdict is not None and next_step(cfg, verdict, counts):
                    verdict["next_step"] = next_step(cfg, verdict, counts)
                if cfg.output.state:
                    from .run_state import write_state
                    write_state(out, user_ids=dataset.user_ids, item_ids=dataset.item_ids, split=split,
                                model=base.model, model_kind=cfg.model.kind, method=cfg.valuation.method,
                                values=valuation.values, valuer_state=valuation.state, run_id=run_id,
                                item_titles=dataset.item_titles)
                if explanation is not None:
                    out.write_table("explanations/attributions",
                                    explanation.attributions_table(dataset, split.train), use_ray=use_ray)
                    out.write_table("explanations/importance", explanation.importance_table(), use_ray=use_ray)
            for s_ in prof.stages:
                timings[f"{s_.name}_s"] = s_.seconds
            metrics["profile"] = prof.summary()
            report = None
            if cfg.output.report:
                with prof.stage("report", rows=len(split.train)):   # in metrics.json, not in the report
                    from .report_builder import build_report
                    numeric = values_tab if values_tab is not None else valued_columns(split, valuation, pruned.keep)
                    report = build_report(cfg, run_id, metrics, numeric, base, valuation, explanation=explanation)
                metrics["profile"] = prof.summary()
            out.write_json("metrics.json", metrics)
            if report is not None:
                out.write_text("report.html", report)
            timings["total_s"] = time.perf_counter() - t_all
            manifest = out.complete(config=cfg.to_dict(), timings=timings)
    finally:
        prof.close()
    return RunResult(uri=out.public_uri, run_id=run_id, metrics=metrics, manifest=manifest, values=values_tab)


# the report's "why these recommendations" on runs up to this size: its objective holds every
# training row's ids and negatives (~24 B a row), which a large log should not pay for a report
WHY_EXAMPLE_MAX_ROWS = 1_000_000


def why_examples(cfg: JobConfig, dataset: Dataset, split: Split, base: TrainResult) -> Optional[list]:
    """The report's examples of single recommendations (MF, NeuMF, LightGCN; ``recval why`` has the
    rest): three seeded users' top-1 items and their strongest proponents, original ids; None
    for other models, runs without a report, or more than WHY_EXAMPLE_MAX_ROWS training rows."""
    from .core.attribution import MODEL_KINDS
    if not cfg.output.report or cfg.model.kind not in MODEL_KINDS or len(split.train) > WHY_EXAMPLE_MAX_ROWS \
            or len(split.valid) == 0 or getattr(base.model, "explicit", False):
        return None
    from .core.attribution import top_recommendation_examples
    try:
        ex = top_recommendation_examples(base.task, split.train, split.valid, seed=cfg.evaluate.sample_seed,
                                         lr=float(cfg.train.lr))
    except (ValueError, RuntimeError) as e:       # an example is never worth failing the run
        log.warning("why examples skipped: %s", e)
        return None
    out = []
    for e in ex:
        ids = lambda codes, m: m(np.asarray(codes, dtype=np.int64)).to_pylist()   # noqa: E731
        pro = e["proponents"]
        out.append({"user_id": ids([e["user"]], dataset.original_users)[0],
                    "item_id": ids([e["item"]], dataset.original_items)[0], "score": e["score"],
                    "share_user_rows": e["share_user_rows"],
                    "proponents": [{"user_id": u_, "item_id": i_, "contribution": c}
                                   for u_, i_, c in zip(ids([p[1] for p in pro], dataset.original_users),
                                                        ids([p[2] for p in pro], dataset.original_items),
                                                        [p[3] for p in pro])]})
    return out


# tables of more rows than this are written chunk by chunk (one Parquet file per chunk)
CHUNK_ROWS = 1 << 20


def write_outputs(out, cfg: JobConfig, dataset: Dataset, split: Split, valuation: Valuation,
                  pruned: "PruneOutcome", values_tab: Optional[pa.Table], use_ray: bool,
                  types: Optional[dict] = None) -> None:
    """``values/``, entity and method tables, ``pruned/`` and ``splits/``. Small tables are
    written whole (Ray Data on Ray); large ones chunk by chunk, never a whole table on the
    driver; the pass-through of a streamed input (``pruned/``) is Ray Data end to end."""
    if values_tab is not None:
        out.write_table("values", values_tab, use_ray=use_ray)
    else:
        valued = valued_rows(split, valuation, pruned.keep, pruned.keep_all)

        def chunks():
            schema = None
            for sl in _chunks(len(valued[0])):
                t = values_table(dataset, split, valuation, pruned.keep, rows=sl, valued=valued)
                schema = t.schema
                yield t
            if valuation.whole_log is not None and schema is not None:
                extra_rows = set_aside_table(dataset, split, schema, use_ray)
                if extra_rows is not None:
                    yield extra_rows
        out.write_chunks("values", chunks())
    if valuation.entities is not None:
        out.write_table(f"{valuation.entity_kind or 'entity'}_values", pa.table(valuation.entities),
                        use_ray=use_ray)
    for name, tab in valuation.tables.items():
        out.write_table(name, pa.table(tab), use_ray=use_ray)
    noise = bool(split.train.is_noise is not None and split.train.is_noise.any())
    if dataset.stream is not None and use_ray:
        from .ray_layer.tables import write_pass_through
        kept = split.train.only(("source_row", "is_noise")).take(pruned.keep)   # what it reads
        write_pass_through(out, "pruned", dataset, kept, noise_column=noise, types=types)
    else:
        kept = split.train.take(pruned.keep)
        def table(part: Interactions) -> pa.Table:   # a CSV/TSV input's columns typed (``types``)
            return typed_text_columns(pruned_table(dataset, part, noise), types or {})
        if len(kept) <= CHUNK_ROWS:
            out.write_table("pruned", table(kept), use_ray=use_ray)
        else:
            out.write_chunks("pruned", (table(kept.take(sl)) for sl in _chunks(len(kept))))
    for name, part in split.parts().items():
        if len(part) <= CHUNK_ROWS:
            out.write_table(f"splits/{name}", interactions_table(dataset, part), use_ray=use_ray)
        else:
            out.write_chunks(f"splits/{name}", (interactions_table(dataset, part.take(sl))
                                                for sl in _chunks(len(part))))


def _chunks(n: int, rows: int = CHUNK_ROWS):
    """Row ranges of ``rows`` (:func:`~.core.spill.row_chunks`: spilled pages released per chunk)."""
    from .core.spill import row_chunks
    return row_chunks(n, rows)


def valued_columns(split: Split, valuation: Valuation, keep: np.ndarray) -> pa.Table:
    """The numeric columns of the valued data (no ids), for the report on large runs."""
    cols = {"value": valuation.values, "kept": keep}
    if split.train.is_noise is not None:
        cols["is_noise"] = split.train.is_noise
    return pa.table(cols)


def explain(cfg: JobConfig, split: Split, dataset: Dataset, valuation: Valuation, metrics: dict,
            timings: dict):
    """``explain.enabled``: Shapley attributions of the values through a surrogate model
    (:mod:`recval_ray.core.explain_values`); adds ``metrics["explain"]``. None when disabled."""
    if not cfg.explain.enabled:
        return None
    from .core.explain_values import explain_array
    t = time.perf_counter()
    log.info("explaining the values (%s surrogate, %s Shapley values)", cfg.explain.surrogate, cfg.explain.backend)
    explanation = explain_array(np.asarray(valuation.values, dtype=np.float64), split.train, dataset, cfg.explain)
    metrics["explain"] = explanation.summary()
    timings["explain_s"] = time.perf_counter() - t
    log.info("explanation: surrogate held-out R^2 %.3f; top features %s", explanation.info["r2_heldout"],
             ", ".join(explanation.top_features(3)))
    return explanation


def build_metrics(cfg, dataset, split, base, base_metrics, valuation, pruned, warnings) -> dict:
    test = {"base": base_metrics}
    test.update(pruned.metrics)
    relative = {}
    for tag in ("pruned", "random_pruned"):
        if tag in test:
            relative[f"{tag}_vs_base"] = {k: (test[tag][k] - v) / v if v else float("nan")
                                          for k, v in base_metrics.items()}
    n_noise = int(split.train.is_noise.sum()) if split.train.is_noise is not None else 0
    # evaluate.sample_users: the seeded sample the test (and validation) metrics are on
    sample = pruned.evaluation or sample_summary(cfg.evaluate, split)
    m = {
        "method": cfg.valuation.method, "model": cfg.model.kind,
        "data": {"format": cfg.data.format, "users": dataset.n_users, "items": dataset.n_items,
                 "train": len(split.train), "valid": len(split.valid), "test": len(split.test),
                 "injected_noise": n_noise, "noise_kind": cfg.noise.kind,
                 "warnings": list(dataset.warnings) + list(warnings)},
        "test": test, **({"evaluation": sample} if sample else {}), "relative": relative,
        "training": {"base": training_summary(base)} | pruned.training,
        "prune": {"strategy": cfg.prune.strategy, "scope": cfg.prune.scope, "dropped": int((~pruned.keep).sum()),
                  "kept": int(pruned.keep.sum()), "test_rows_left_out": pruned.test_rows_left_out},
        "valuation": dict(valuation.info),
        "coverage": valuation.whole_log.info() if valuation.whole_log is not None else
        {"coverage": "train", "rows_valued": {"train": int(len(valuation.values))}},
    }
    for name, tab in valuation.tables.items():
        rows = len(next(iter(tab.values()), []))
        # small tables (e.g. a removal experiment) are copied into metrics.json; large ones
        # (e.g. per-interaction reference values) are only written as tables
        m[name] = ([dict(zip(tab, row)) for row in zip(*tab.values())] if rows <= MAX_METRICS_TABLE_ROWS
                   else {"rows": rows, "table": name})
    if n_noise:
        m["noise_detection"] = noise_detection(valuation.values, split.train.is_noise)
        dropped = ~pruned.keep
        m["prune"]["noise_dropped"] = int((dropped & split.train.is_noise).sum())
        if pruned.random_keep is not None:
            m["prune"]["noise_dropped_random"] = int((~pruned.random_keep & split.train.is_noise).sum())
    return m


def headline(cfg: JobConfig, result: RunResult) -> str:
    """A few lines for the terminal: where outputs are, base vs pruned vs random, noise AUC."""
    m = result.metrics
    keys = [k for k in m["test"]["base"] if k.startswith(("recall@", "ndcg@"))][:4]
    uri = result.uri if "://" in result.uri else os.path.abspath(result.uri)
    lines = [f"run {result.run_id} complete: {uri}"
             + (f"\nreport: {uri.rstrip('/')}/report.html" if cfg.output.report else ""),
             f"{'model':<15}" + "".join(f"{k:>12}" for k in keys)]
    for tag in ("base", "pruned", "random_pruned"):
        if tag in m["test"]:
            lines.append(f"{tag:<15}" + "".join(f"{m['test'][tag][k]:>12.4f}" for k in keys))
    if sample_note(m.get("evaluation")):
        lines.append(f"({sample_note(m['evaluation'])}, seed {m['evaluation']['seed']})")
    if "noise_detection" in m:
        nd = m["noise_detection"]
        lines.append(f"noise detection ({m['method']}): AUC {nd['auc']:.4f}, precision@{nd['n_noise']} "
                     f"{nd['precision_at_n']:.4f} (base rate {nd['base_rate']:.4f})")
    cov = m.get("coverage", {})
    if cov.get("coverage") == "all":
        rv = cov["rows_valued"]
        lines.append(f"valued every row of the log ({sum(rv.values())}: train {rv['train']}, valid {rv['valid']}, "
                     f"test {rv['test']}) by {cov['folds']}-fold cross-fitting"
                     + (f"; drop/ holds {m['keep_drop']['drop']} input rows" if "keep_drop" in m else ""))
    p = m["prune"]
    lines.append(f"pruned {p['dropped']} of {p['dropped'] + p['kept']} training interactions"
                 + (f" ({p['noise_dropped']} injected)" if "noise_dropped" in p else ""))
    if p["scope"] == "per-user" and p["strategy"] == "fraction":
        lines.append(f"(per user: floor({cfg.prune.fraction:g} x the user's training rows), at least one row "
                     f"kept per user; users with fewer than {math.ceil(1 / cfg.prune.fraction):d} rows drop "
                     f"none, so fewer than {cfg.prune.fraction:.0%} in total)")
    v = m.get("verdict")
    if v and v.get("next_step"):
        lines.append(v["next_step"])
    if v:
        lines.append(f"verdict: {v['sentence']}" if v.get("decision") else f"verdict: not computed ({v['skipped']})")
    return "\n".join(lines)


def next_step(cfg: JobConfig, verdict: dict, keep_drop: Optional[dict]) -> Optional[str]:
    """What the user does with the verdict, given what this run wrote to ``drop/`` (the job's
    ``prune`` settings): nothing to say when they agree."""
    if not verdict or not verdict.get("decision"):
        return None
    dropped = keep_drop["drop"] if keep_drop else None
    if verdict["decision"] == "keep":
        if dropped:
            return (f"drop/ lists the {dropped:,} rows that prune: ({cfg.valuation.method}, {cfg.prune.strategy} "
                    f"{cfg.prune.fraction:g}, {cfg.prune.scope}) selects, for inspection: the verdict found no "
                    f"pruning worth applying, so train on the whole log")
        return None
    same = (verdict["method"] == cfg.valuation.method and cfg.prune.strategy == "fraction"
            and abs(verdict["fraction"] - cfg.prune.fraction) < 1e-12 and verdict["scope"] == cfg.prune.scope)
    if same:
        return None
    return (f"drop/ holds prune:'s rows, not the verdict's choice; to write the verdict's drop list: --set "
            f"valuation.method={verdict['method']} --set prune.fraction={verdict['fraction']:g} "
            f"--set prune.scope={verdict['scope']}")
