"""The Ray Tune side of ``recval sweep``: search space, trial function, scheduler, resume.

The trials' logic is Ray-free (:func:`recval_ray.sweep.run_trial`); here it runs as a Tune
function trainable. The job and the shared ``(dataset, split)`` reach the trials through
``tune.with_parameters`` (one ``ray.put`` each, every trial ``ray.get``-s the same object);
a trial holds ``tune.trial_cpus`` CPUs and ``tune.trial_gpus`` GPUs and trains in-process.
With ``tune.scheduler: asha`` every epoch reports the objective so far (the base model's for
``objective: base``, else the retrained model's), and ASHA stops the weak trials at its rungs
(``time_attr``: Tune's ``training_iteration``, one per epoch; the trial's last report, the
final one, carries ``final: 1``). Trials are named from their overrides and their position in
Tune's deterministic generation order; sampling is seeded (``tune.seed``). The experiment
(``storage_path``/``name``) is restored with ``Tuner.restore`` when it exists, so finished
trials are never rerun; errored ones restart.
"""
from __future__ import annotations

import copy
import logging
import os
import posixpath
import shutil
from typing import Optional

from ray import tune

from ..sweep import Dimension, TrialRow, _plain, max_epochs, objective_mode, trial_name

log = logging.getLogger("recval_ray")

TUNE_DIR = "_tune"    # Tune's experiment state under a local run (kept across reruns)


def to_tune_space(dims: list[Dimension]) -> dict:
    """``{dotted key: Tune domain}``: ``grid`` -> ``tune.grid_search``, ``choice`` ->
    ``tune.choice``, ``uniform`` / ``loguniform`` / ``randint`` -> the same-named Tune domains."""
    out = {}
    for d in dims:
        if d.kind == "grid":
            out[d.key] = tune.grid_search(list(d.values))
        elif d.kind == "choice":
            out[d.key] = tune.choice(list(d.values))
        elif d.kind == "uniform":
            out[d.key] = tune.uniform(*d.values)
        elif d.kind == "loguniform":
            out[d.key] = tune.loguniform(*d.values)
        elif d.kind == "randint":
            out[d.key] = tune.randint(*d.values)
        else:  # pragma: no cover - parse_dimension refuses others
            raise ValueError(f"unknown distribution {d.kind!r}")
    return out


def expand_space(dims: list[Dimension], num_samples: int = 1, seed: int = 0) -> list[dict]:
    """The trials' overrides in the order Tune's ``BasicVariantGenerator(random_state=seed)``
    generates them (``num_samples`` passes over the grid, random keys drawn per trial)."""
    from ray.tune.search.sample import _BackwardsCompatibleNumpyRng
    from ray.tune.search.variant_generator import generate_variants

    space = to_tune_space(dims)
    rng = _BackwardsCompatibleNumpyRng(seed)
    out = []
    for _ in range(num_samples):
        for _, spec in generate_variants({"config": space}, random_state=rng):
            out.append({d.key: _plain(spec["config"][d.key]) for d in dims})
    return out


def _trial_index(trial) -> int:
    """A trial's position in the generation order (Tune's trial ids end in a 5-digit counter)."""
    try:
        return int(str(trial.trial_id).rsplit("_", 1)[1])
    except (IndexError, ValueError):  # pragma: no cover - other id formats
        return int(str(trial.experiment_tag).split("_", 1)[0])


class _Namer:
    """``trial_name_creator`` / ``trial_dirname_creator``: :func:`recval_ray.sweep.trial_name`
    of the trial's overrides (picklable: Tune stores it with the experiment)."""

    def __init__(self, keys: list[str]):
        self.keys = list(keys)

    def __call__(self, trial) -> str:
        return trial_name(_trial_index(trial), {k: _plain(trial.config[k]) for k in self.keys})


class _Progress(tune.Callback):
    """Logs each finished trial: ``trial i of N finished``, its state and objective."""

    def __init__(self, total: int, metric: str):
        self.total, self.metric = total, metric

    def _done(self, trials, trial) -> int:
        return sum(1 for t in trials if t is trial or t.status in ("TERMINATED", "ERROR"))

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        state = "complete" if r.get("final") == 1 else f"stopped early by the scheduler at iteration " \
                                                       f"{r.get('training_iteration')}"
        obj = r.get("objective")
        log.info("trial %d of %d finished (%s): %s, validation %s %s", self._done(trials, trial), self.total,
                 state, trial.custom_trial_name or trial.trial_id, self.metric,
                 f"{obj:.4f}" if isinstance(obj, (int, float)) else obj)

    def on_trial_error(self, iteration, trials, trial, **info):
        log.warning("trial %d of %d failed: %s (%s)", self._done(trials, trial), self.total,
                    trial.custom_trial_name or trial.trial_id, trial.error_file)


def _trainable(config: dict, job=None, keys=None, data=None, threads: int = 1) -> None:
    """One trial: :func:`recval_ray.sweep.run_trial` on the trial's overrides; per-epoch
    reports under ASHA, then the final result (validation objective + test metrics)."""
    import torch

    from ..sweep import run_trial
    torch.set_num_threads(max(1, int(threads)))
    overrides = {k: config[k] for k in keys}
    if data is not None:   # the object store's arrays are read-only; torch wants writable ones
        data = copy.deepcopy(data)
    report_epoch = tune.report if job.tune.scheduler == "asha" else None
    tune.report(run_trial(job, overrides, data=data, report_epoch=report_epoch))


def max_concurrent(cfg, on_cluster: bool) -> int:
    """``tune.max_concurrent``, or the cluster's CPUs / ``trial_cpus`` (GPUs / ``trial_gpus``);
    on a local instance at most the physical cores / ``trial_cpus`` (the local instance
    declares more logical CPUs than cores, see :func:`..session.ensure_ray`)."""
    import ray
    t = cfg.tune
    if t.max_concurrent:
        return int(t.max_concurrent)
    res = ray.cluster_resources()
    n = int(res.get("CPU", 1) // t.trial_cpus)
    if not on_cluster:
        n = min(n, int((os.cpu_count() or 1) // t.trial_cpus))
    if t.trial_gpus > 0:
        n = min(n, int(res.get("GPU", 0) // t.trial_gpus))
    return max(1, n)


def run_tune(cfg, dims: list[Dimension], *, storage: str, name: str, data=None, on_cluster: bool = False,
             total: Optional[int] = None) -> list[TrialRow]:
    """Run (or resume) the experiment ``storage/name`` and return its trials in generation
    order. ``data``: ``(dataset, split)`` shared by every trial (None: each trial loads)."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from ..sweep import metric_name
    t = cfg.tune
    keys = [d.key for d in dims]
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, job=cfg, keys=keys, data=data, threads=max(1, int(t.trial_cpus))),
        {"cpu": t.trial_cpus, "gpu": t.trial_gpus})
    path = posixpath.join(storage, name)
    if os.path.isdir(storage):   # the run's Tune dir: experiments of an earlier, different job go
        for entry in os.listdir(storage):
            if entry != name:
                log.info("removing the Tune experiment of an earlier job: %s", entry)
                shutil.rmtree(os.path.join(storage, entry), ignore_errors=True)
    if tune.Tuner.can_restore(path):
        log.info("resuming the sweep's Tune experiment at %s (finished trials are not rerun)", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=True)
    else:
        os.makedirs(storage, exist_ok=True)
        scheduler = None
        if t.scheduler == "asha":
            scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=t.grace_period,
                                      reduction_factor=t.reduction_factor,
                                      max_t=t.max_t or max_epochs(cfg, dims) + 1)
        mc = max_concurrent(cfg, on_cluster)
        log.info("Tune: up to %d concurrent trial(s), %s CPU / %s GPU each%s", mc, t.trial_cpus, t.trial_gpus,
                 ", ASHA scheduler" if scheduler else "")
        namer = _Namer(keys)
        tuner = tune.Tuner(
            trainable, param_space=to_tune_space(dims),
            tune_config=tune.TuneConfig(metric="objective", mode=objective_mode(cfg), scheduler=scheduler,
                                        # the generator limits concurrency itself (Tune ignores
                                        # max_concurrent_trials next to a BasicVariantGenerator)
                                        search_alg=BasicVariantGenerator(random_state=t.seed, max_concurrent=mc),
                                        num_samples=t.num_samples, reuse_actors=True,
                                        trial_name_creator=namer, trial_dirname_creator=namer),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      callbacks=[_Progress(total or 0, metric_name(cfg))]))
    grid = tuner.fit()
    rows = []
    for res in grid:
        cfg_t = res.config or {}
        err = None
        if res.error is not None:
            err = str(res.error).strip().splitlines()[-1][:500] if str(res.error).strip() else repr(res.error)
        rows.append(TrialRow(name=posixpath.basename(str(res.path).rstrip("/")),
                             overrides={k: _plain(cfg_t.get(k)) for k in keys}, result=dict(res.metrics or {}),
                             error=err))
    rows.sort(key=lambda r: r.name)
    return rows
