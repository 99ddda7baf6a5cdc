"""Counterfactual checks of a run's values (``valuation.checks``; ``recval check RUN_URI``).

LDS (:mod:`.core.counterfactual`): ``subsets`` models of the job's model, each trained with
the job's training settings for the base model's selected number of epochs (no early stopping:
the outcome is measured on validation, so nothing is selected on it) on a seeded fraction of
the training rows, are scored per validation user on the job's metric and, for BPR models, by
the mean BPR loss of the validation rows; the values of every method given are checked against
the same models (they do not depend on the values, so any number of methods costs the same
trainings). Each training is a work item (:func:`subset_training`): in this process, or on Ray
actors with ``valuation.checks.actors``; the results depend only on the config, never on where
they ran. ``valuation.checks.lds.engine: stacked`` trains every subset model of a seed at once
for the models the batched engine knows (NCF/NeuMF, SVD, MF-BPR: :mod:`.core.valuers.deletion.stacked`,
its row-sparse optimisers; every model starts from the same weights and sees the whole
training's batch stream with the rows outside its subset masked).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Optional

import numpy as np

from .core.counterfactual import lds_of_effects, per_user_lds_of_effects, subset_effects, subset_mask
from .core.data import Split
from .core.evaluation import eligible_users, evaluation_users, per_user_metric
from .core.executor import LocalExecutor
from .core.train import training_rows
from .schema import JobConfig

log = logging.getLogger("recval_ray")


def lds_metric(cfg: JobConfig) -> str:
    return cfg.checks.lds.metric or cfg.train.select_metric


def _outcomes(cfg: JobConfig, split: Split, model, task, kept, seed: int) -> dict:
    """A check model's outcomes: per-user validation metric (the split's evaluation users, in
    order) and, for a BPR task, the mean BPR loss of the validation rows (negatives from a
    stream seeded by the check's ``seed`` alone: the same for every model). ``kept``: the
    rows the model read as the users' histories (None: the whole training set)."""
    out = {"valid": per_user_metric(model, split, cfg.evaluate, lds_metric(cfg), "valid",
                                    context=None if kept is None else [kept]),
           "loss": None}
    if hasattr(task, "pair_losses") and len(split.valid):
        from .core.crossfit import task_losses
        out["loss"] = float(np.mean(task_losses(task, split.valid, [int(seed), 0x4C4F], 1)))
    return out


def subset_training(shared, item: dict) -> dict:
    """One model of the LDS, a work item: the job's model trained on subset ``item["j"]`` for
    ``epochs`` epochs with ``train.seed = item["seed"]`` (:func:`_outcomes`)."""
    from .core.train import build_task, fit
    cfg, split, epochs = shared
    lc = cfg.checks.lds
    keep = subset_mask(len(split.train), lc.fraction, lc.seed, item["j"])
    kept = training_rows(cfg.model.kind, split.train, keep)
    tcfg = dataclasses.replace(cfg.train, epochs=int(epochs), seed=int(item["seed"]))
    res = fit(build_task(cfg.model, kept, tcfg), tcfg, valid=None, track_losses=False)
    return _outcomes(cfg, split, res.model, res.task, kept, lc.seed)


def _stacked_subsets(cfg: JobConfig, split: Split, epochs: int, seed: int) -> list:
    """Every subset model of one training seed in one batched run (``engine: stacked``)."""
    import copy

    import torch

    from .core.train import build_task
    from .core.valuers.deletion.stacked import train_stacked
    lc = cfg.checks.lds
    n = len(split.train)
    tcfg = dataclasses.replace(cfg.train, epochs=int(epochs), seed=int(seed))
    task = build_task(cfg.model, split.train, tcfg)
    drop = torch.stack([~torch.as_tensor(subset_mask(n, lc.fraction, lc.seed, j)) for j in range(lc.subsets)])
    stack = train_stacked(task, tcfg, drop, torch.arange(n), seed=int(seed))
    module = copy.deepcopy(task.model)
    module.eval()
    out = []
    for j in range(lc.subsets):
        kept = training_rows(cfg.model.kind, split.train, ~drop[j].numpy())
        loss_task = None
        if hasattr(task, "pair_losses"):    # the validation loss as the sequential path measures it:
            loss_task = build_task(cfg.model, kept, tcfg)       # negatives outside the kept rows
            loss_task.model = module
        out.append(_outcomes(cfg, split, stack.load(module, j), loss_task, kept, lc.seed))
    return out


def train_subsets(cfg: JobConfig, split: Split, epochs: int, executor=None,
                  progress: Optional[Callable[[str], None]] = None) -> dict:
    """Every model of the LDS (``subsets`` x ``seeds`` trainings of ``epochs`` epochs),
    assembled by subset: ``{"valid": [M, users] (mean over seeds), "loss": [M] or None,
    "users": eval users}``."""
    lc = cfg.checks.lds
    items = [{"j": j, "seed": int(cfg.train.seed) + s} for j in range(lc.subsets) for s in range(lc.seeds)]
    out: list = [None] * len(items)
    t0 = time.perf_counter()

    def done(i, result):
        out[i] = result
        if progress is not None:
            n = sum(r is not None for r in out)
            el = time.perf_counter() - t0
            progress(f"lds: {n}/{len(items)} subset models trained ({el:.0f} s, ~{el / n * (len(items) - n):.0f} s left)")
    if lc.engine == "stacked":
        for s in range(lc.seeds):
            for j, result in enumerate(_stacked_subsets(cfg, split, epochs, int(cfg.train.seed) + s)):
                done(j * lc.seeds + s, result)
    else:
        (executor or LocalExecutor()).map(subset_training, (cfg, split, epochs), items, done)
    valid = np.stack([np.mean([out[j * lc.seeds + s]["valid"] for s in range(lc.seeds)], axis=0)
                      for j in range(lc.subsets)])
    has_loss = all(r["loss"] is not None for r in out)
    loss = np.array([np.mean([out[j * lc.seeds + s]["loss"] for s in range(lc.seeds)]) for j in range(lc.subsets)]) \
        if has_loss else None
    users, _ = evaluation_users(cfg.evaluate, split.valid)
    if isinstance(users, str):      # every eligible user, in index order (as ranking_metrics takes them)
        users = eligible_users(split.valid, users)
    return {"valid": valid, "loss": loss, "users": np.asarray(users, dtype=np.int64),
            "seconds": time.perf_counter() - t0}


def lds_of(cfg: JobConfig, split: Split, values: dict, models: dict) -> dict:
    """The LDS of every ``label -> values`` (one per training row) against the subset models
    ``models`` (:func:`train_subsets`): on the mean validation metric, per user, and on the
    negated validation loss when there is one. One pass over the subsets for every method."""
    lc = cfg.checks.lds
    metric = lds_metric(cfg)
    effects = subset_effects(values, len(split.train), lc.fraction, lc.seed, lc.subsets,
                             row_user=split.train.user, users=models["users"])
    out = {}
    for label, e in effects.items():
        res = lds_of_effects(e["g"], models["valid"].mean(1), outcome=f"valid {metric}", fraction=lc.fraction,
                             bootstrap=lc.bootstrap, seed=lc.seed)
        res.per_user = per_user_lds_of_effects(e["per_user"], models["valid"], models["users"])
        out[label] = {"metric": res.as_dict()}
        if models.get("loss") is not None:
            out[label]["loss"] = lds_of_effects(e["g"], -np.asarray(models["loss"]), outcome="valid BPR loss (negated)",
                                                fraction=lc.fraction, bootstrap=lc.bootstrap, seed=lc.seed).as_dict()
    return out


def loo_rows(cfg: JobConfig, n_train: int) -> np.ndarray:
    """The seeded sample of training rows the leave-one-out check removes, ascending."""
    lc = cfg.checks.loo
    rng = np.random.default_rng(np.random.SeedSequence([int(lc.seed), 0x100]))
    return np.sort(rng.choice(n_train, size=min(int(lc.rows), n_train), replace=False))


def loo_training(shared, item: dict) -> dict:
    """One model of the leave-one-out check, a work item: the job's model trained for
    ``epochs`` epochs (no early stopping: every model stops at the same epoch) on the whole
    training set with row ``item["row"]`` removed from the batch stream (-1: none), seed
    ``item["seed"]``; returns its mean validation metric and (BPR models) mean validation BPR
    loss with seeded negatives."""
    import torch

    from .core.train import build_task, fit
    cfg, split, epochs = shared
    tcfg = dataclasses.replace(cfg.train, epochs=int(epochs), seed=int(item["seed"]))
    task = build_task(cfg.model, split.train, tcfg)
    drop = None
    if item["row"] >= 0:
        drop = torch.zeros(len(split.train), dtype=torch.bool, device=task.device)
        drop[int(item["row"])] = True
    res = fit(task, tcfg, valid=None, track_losses=False, drop_rows=drop)
    out = _outcomes(cfg, split, res.model, task, None, cfg.checks.loo.seed)
    return {"metric": float(np.mean(out["valid"])), "loss": out["loss"]}


def loo_effects(cfg: JobConfig, split: Split, epochs: int, executor=None,
                progress: Optional[Callable[[str], None]] = None) -> dict:
    """The actual effect of removing each sampled row (:func:`loo_rows`): ``metric`` = the full
    model's validation metric minus the model's without the row, ``loss`` = the validation loss
    without the row minus the full model's (both positive when the row helped)."""
    rows = loo_rows(cfg, len(split.train))
    seed = int(cfg.train.seed)
    items = [{"row": -1, "seed": seed}] + [{"row": int(r), "seed": seed} for r in rows]
    out: list = [None] * len(items)
    t0 = time.perf_counter()

    def done(i, result):
        out[i] = result
        if progress is not None:
            n = sum(r is not None for r in out)
            if n % max(1, len(items) // 10) == 0 or n == len(items):
                el = time.perf_counter() - t0
                progress(f"loo: {n}/{len(items)} models trained ({el:.0f} s, ~{el / n * (len(items) - n):.0f} s left)")
    (executor or LocalExecutor()).map(loo_training, (cfg, split, epochs), items, done)
    full, rest = out[0], out[1:]
    metric = np.array([full["metric"] - r["metric"] for r in rest])
    loss = np.array([r["loss"] - full["loss"] for r in rest]) if full["loss"] is not None else None
    return {"rows": rows, "metric": metric, "loss": loss, "epochs": int(epochs),
            "seconds": time.perf_counter() - t0}


def loo_of(values: np.ndarray, effects: dict) -> dict:
    """Spearman between the values of the sampled rows and their leave-one-out effects (with a
    bootstrap SE over rows)."""
    from .core.counterfactual import bootstrap_se, spearman
    v = np.asarray(values, dtype=np.float64)[effects["rows"]]
    out = {"rows": int(len(v)), "metric": spearman(v, effects["metric"]),
           "metric_se": bootstrap_se(v, effects["metric"], 500, 0),
           "changed": int(np.count_nonzero(effects["metric"]))}
    if effects["loss"] is not None:
        out["loss"] = spearman(v, effects["loss"])
        out["loss_se"] = bootstrap_se(v, effects["loss"], 500, 0)
    return out


def loo_epochs(cfg: JobConfig, base_epochs: Optional[int]) -> int:
    """The leave-one-out models' epochs: the base model's selected epoch count when known."""
    return int(base_epochs) if base_epochs else int(cfg.train.epochs)


def run_checks(cfg: JobConfig, split: Split, valuations: list, executor=None,
               base_epochs: Optional[int] = None) -> Optional[dict]:
    """``metrics["checks"]``: the LDS of every ``(label, Valuation)`` given, over one set of
    subset models; None when ``valuation.checks.lds.subsets`` is 0. Entity-level values
    (deletion) are checked through their rows: each training row carries its entity's value."""
    lc = cfg.checks.lds
    result: dict = {}
    if cfg.checks.loo.rows > 0:
        effects = loo_effects(cfg, split, loo_epochs(cfg, base_epochs), executor, progress=log.info)
        result["loo"] = {"rows": int(len(effects["rows"])), "epochs": effects["epochs"],
                         "seconds": round(effects["seconds"], 1), "metric": lds_metric(cfg),
                         "methods": {label: loo_of(v.values, effects) for label, v in valuations},
                         "note": "Spearman over a seeded sample of training rows between each row's value and "
                                 "the effect of retraining without it (same initialisation and batch stream "
                                 "minus the row; positive when the row helped)"}
        for label, r in result["loo"]["methods"].items():
            log.info("checks: %s: leave-one-out correlation %.3f +- %.3f (metric; %d of %d removals changed it)%s",
                     label, r["metric"], r["metric_se"], r["changed"], r["rows"],
                     f", {r['loss']:.3f} +- {r['loss_se']:.3f} (validation loss)" if "loss" in r else "")
    if lc.subsets <= 0:
        return result or None
    log.info("checks: LDS over %d subsets of %.0f%% of the training rows (%d training seed(s) each), "
             "validation %s", lc.subsets, 100 * lc.fraction, lc.seeds, lds_metric(cfg))
    models = train_subsets(cfg, split, loo_epochs(cfg, base_epochs), executor, progress=log.info)
    per_method = lds_of(cfg, split, {label: v.values for label, v in valuations}, models)
    for label in per_method:
        m = per_method[label]["metric"]
        log.info("checks: %s: LDS %.3f +- %.3f (per user %.3f +- %.3f over %d users)%s", label, m["lds"], m["se"],
                 m["per_user"]["mean"], m["per_user"]["se"], m["per_user"]["users"],
                 f"; on the validation loss {per_method[label]['loss']['lds']:.3f} +- "
                 f"{per_method[label]['loss']['se']:.3f}" if "loss" in per_method[label] else "")
    return result | {"lds": {"subsets": lc.subsets, "fraction": lc.fraction, "seeds": lc.seeds, "seed": lc.seed,
                    "metric": lds_metric(cfg), "seconds": round(models["seconds"], 1),
                    "users": int(len(models["users"])), "methods": per_method,
                    "note": "Spearman over subsets between the sum of the kept rows' values and the outcome "
                            "of a model trained on them (higher is better; ~0: no counterfactual signal); "
                            "SE: bootstrap over subsets"}}


def checks_executor(cfg: JobConfig, use_ray: bool):
    """Ray actors for the check's trainings (``valuation.checks.actors`` > 0 and Ray on)."""
    n = int(cfg.checks.actors)
    if not use_ray or n <= 0:
        return None
    from .ray_layer.actors import ActorPoolExecutor
    from .ray_layer.session import ensure_ray
    ensure_ray(cfg.ray)
    return ActorPoolExecutor(n, cfg.checks.cpus, 0.0)


def report_section(rep, checks: Optional[dict]) -> None:
    """The checks in a run's report: the LDS of every method (table), and for each method the
    subsets' predicted effect against the outcome of the model trained on them (scatter)."""
    if not checks:
        return
    if "loo" in checks:
        lo = checks["loo"]
        rep.heading("Does each row's value predict retraining without it? (leave-one-out)")
        rep.paragraph(f"{lo['rows']} seeded training rows, each removed from the full training's batch stream "
                      f"(same initialisation, {lo['epochs']} epochs, {lo['seconds']:.0f} s in all). {lo['note']}.")
        rep.table([{"method": label, "LOO correlation": r["metric"], "SE": r["metric_se"],
                    "removals that changed the metric": r["changed"], "LOO correlation (loss)": r.get("loss"),
                    "SE (loss)": r.get("loss_se")} for label, r in lo["methods"].items()],
                  ["method", "LOO correlation", "SE", "removals that changed the metric", "LOO correlation (loss)",
                   "SE (loss)"], caption=f"validation {lo['metric']} and validation BPR loss")
    if "lds" not in checks:
        return
    c = checks["lds"]
    rep.heading("Do the values predict retraining? (LDS)")
    rep.paragraph(f"{c['subsets']} models, each trained on a random {100 * c['fraction']:.0f}% of the training "
                  f"rows ({c['seeds']} training seed(s) each, {c['seconds']:.0f} s). For each method, the "
                  f"Spearman correlation over subsets between the sum of the kept rows' values and the model's "
                  f"validation {c['metric']} (LDS; 1: the values rank what the data does; ~0: no "
                  f"counterfactual signal, as random values), per user against each user's own metric "
                  f"({c['users']} validation users), and against the validation BPR loss where there is one.")
    rows = []
    for label, m in c["methods"].items():
        pu = m["metric"]["per_user"] or {}
        rows.append({"method": label, "LDS": m["metric"]["lds"], "SE": m["metric"]["se"],
                     "per-user LDS": pu.get("mean"), "per-user SE": pu.get("se"), "users": pu.get("users"),
                     "LDS (loss)": m["loss"]["lds"] if "loss" in m else None,
                     "SE (loss)": m["loss"]["se"] if "loss" in m else None})
    rep.table(rows, ["method", "LDS", "SE", "per-user LDS", "per-user SE", "users", "LDS (loss)", "SE (loss)"],
              caption=c["note"])
    for label, m in c["methods"].items():
        rep.scatter(m["metric"]["predicted"], m["metric"]["actual"],
                    title=f"{label}: LDS {m['metric']['lds']:.3f} +- {m['metric']['se']:.3f}",
                    xlabel="sum of the kept rows' values", ylabel=f"validation {c['metric']}")
