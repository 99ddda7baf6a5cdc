"""``recval compare``: the job over several seeds and variants, mean and std per metric.

For each seed s of ``compare.seeds`` (``<section>.seed = s`` for every section of
``compare.vary``; by default ``train`` and ``prune``, so every seed sees the same split and
injected noise):

* ``full``: the base model trained on all (noisy) training data, as ``recval run`` trains it;
* for each compared valuation method (the job's own ``valuation`` first, then
  ``compare.methods``), valued on that base model and pruned with the job's ``prune`` settings:
  ``pruned`` (retrained on the kept rows) and ``random`` (retrained without as many random rows,
  the job's random control: seed ``prune.seed + 1``);
* ``oracle``: retrained without the injected noise (the rows with ``is_noise``).

Every model is selected on validation only (the trainer's early stopping) and evaluated on
the test split with the job's ``evaluate`` metrics, against the same excluded items (the full
training set and the validation set). Noise detection of every method (ROC AUC of ``-value``
for ``is_noise``, precision among the ``n_noise`` lowest values) is measured per seed.

Everything reuses the stages of :mod:`recval_ray.pipeline`; the numbers of a seed depend only
on the config and that seed, never on which other seeds or methods run (two variants that
train on exactly the same rows, e.g. the random controls of two methods pruning the same
count, share one training, which is deterministic).

Outputs (``<output.uri>/<run id>/``, run id ``<name>-compare`` unless given; ``manifest.json``
last): ``comparison/`` (one row per seed, variant, method, metric and value; noise detection
as variant ``detection``), ``comparison_runs/`` (one row per trained model: rows trained on,
rows and injected rows dropped, selected epoch), ``method_values/<label>/`` (the first seed's
valued data of each method, the ``values/`` schema of ``recval run``), ``splits/`` (the first
seed's), ``metrics.json`` (mean and std over seeds per variant and metric, relative
differences to ``full`` paired by seed, noise detection) and ``report.html``.

The methods value the training data only when a variant needs them (:func:`runs_valuation`):
``compare.variants: [full]`` trains and evaluates only.

``compare.grid`` (see :mod:`recval_ray.grid`): every cell (the job with the cell's overrides)
is compared as above, cell after cell; its split is made once per cell (shared by its seeds
unless split or noise vary with the seed; cells with the same data, split and noise sections
share one). Without a grid the outputs are exactly the above. With one: ``comparison/`` and
``comparison_runs/`` lead with ``cell`` (the cell id), one string column per grid key (the
value as shown in the cell's label) and ``<key>_num`` (float) for a key whose values are all
numbers; ``method_values/<cell>/<label>/`` and ``splits/<cell>/<part>/`` hold each cell's first
seed; ``metrics.json`` has ``grid`` (keys, mode, values, numeric keys) and ``cells`` (per cell:
id, label, overrides, values, skipped variants, data sizes, ``summary``, ``relative_to_full``
(to the cell's own ``full``), ``noise_detection``, valuation info) instead of the top-level
``summary`` / ``relative_to_full`` / ``noise_detection``; ``runs`` carry the cell columns.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa

from .config import JobConfig, check_compare, compare_methods, compare_variants
from .grid import Cell, grid_cells, grid_keys, numeric_keys
from .core.data import Split
from .core.evaluation import evaluate_ranking, noise_detection, per_user_metric
from .core.train import RATING_METRICS, training_rows
from .core.verdict import (Candidate, best_candidate, bootstrap_relative_change, decide, paired_t_test,
                           relative_change, sentence)
from .core.valuers.base import Valuation
from .pipeline import (load_data, open_run, make_executor, make_split, preflight, prune_masks, retrain_and_evaluate,
                       train, training_summary, values_table, interactions_table)

log = logging.getLogger("recval_ray")

DETECTION = "detection"          # the variant name of the noise-detection rows
DETECTION_METRICS = ("auc", "precision_at_n")
CHECKS = "checks"                # the variant name of the counterfactual checks' rows (valuation.checks)
CHECK_METRICS = ("lds", "lds_se", "lds_per_user", "lds_loss", "loo", "loo_loss")
TABLE_SCHEMA = pa.schema([("seed", pa.int64()), ("variant", pa.string()), ("method", pa.string()),
                          ("metric", pa.string()), ("value", pa.float64())])


def variant_label(variant: str, method: str) -> str:
    """``full``, ``oracle``, ``pruned:<method>``, ``random:<method>``, ``detection:<method>``."""
    return f"{variant}:{method}" if method else variant


def seed_config(cfg: JobConfig, seed: int) -> JobConfig:
    """The job for one seed: ``<section>.seed = seed`` for every section in ``compare.vary``."""
    out = copy.deepcopy(cfg)
    for section in cfg.compare.vary:
        getattr(out, section).seed = int(seed)
    return out


def runs_valuation(cfg: JobConfig) -> bool:
    """Whether the compared methods value the data: a listed variant needs them (``pruned``,
    ``random``, ``detection``), or by default (``compare.variants`` empty) pruning or noise
    applies. ``compare.variants: [full]`` (or ``[full, oracle]``) trains and evaluates only."""
    listed = cfg.compare.variants
    if listed:
        return bool({"pruned", "random", "detection"} & set(listed))
    return cfg.prune.strategy != "none" or cfg.noise.has_ground_truth()


def compared_methods(cfg: JobConfig) -> list:
    """``compare_methods(cfg)`` when the job values the data (:func:`runs_valuation`), else []."""
    return compare_methods(cfg) if runs_valuation(cfg) else []


def _mask_key(mask: np.ndarray) -> str:
    return f"{len(mask)}:" + hashlib.sha256(np.packbits(np.asarray(mask, bool)).tobytes()).hexdigest()


@dataclass
class SeedOutcome:
    """One seed's results: long-format rows, one row per trained model, the valuations."""
    seed: int
    split: Split
    rows: list = field(default_factory=list)        # (seed, variant, method, metric, value)
    runs: list = field(default_factory=list)        # dicts, one per model
    valuations: dict = field(default_factory=dict)  # label -> (Valuation, keep mask)
    warnings: list = field(default_factory=list)
    per_user: dict = field(default_factory=dict)    # variant label -> (valid, test) per-user metric (verdict)
    dropped: dict = field(default_factory=dict)     # method label -> rows its pruning dropped
    keep_all: dict = field(default_factory=dict)    # method label -> kept rows of the whole log (coverage: all)
    values: dict = field(default_factory=dict)      # method label -> values of the training rows (seed stability)


def compare_seed(cfg: JobConfig, dataset, seed: int, *, position: str = "", shared_split=None,
                 use_ray: bool = False, work_dir: Optional[str] = None, stores=None,
                 base_storage: Optional[str] = None) -> SeedOutcome:
    """Train, value, prune and retrain every variant of one seed (see the module docstring).

    ``shared_split``: ``(split, warnings)`` when split and noise do not vary with the seed;
    ``stores(label)``: a resumable work store for a method's valuation (or None)."""
    from .pipeline import value

    cfg_s = seed_config(cfg, seed)
    variants = compare_variants(cfg)
    methods = compared_methods(cfg_s)
    split, warnings = shared_split if shared_split is not None else make_split(cfg_s, dataset)
    out = SeedOutcome(seed=int(seed), split=split, warnings=list(warnings))
    is_noise = split.train.is_noise
    n_noise = int(is_noise.sum()) if is_noise is not None else 0
    n_train = len(split.train)
    where = f"seed {seed}{position}"

    def record(variant: str, method: str, metrics: dict, mask: Optional[np.ndarray], summary: dict,
               shared: bool = False):
        for k, v in metrics.items():
            out.rows.append((int(seed), variant, method, k, float(v)))
        dropped = np.zeros(n_train, bool) if mask is None else ~mask
        out.runs.append({"seed": int(seed), "variant": variant, "method": method,
                         "n_train": int(n_train - dropped.sum()), "dropped": int(dropped.sum()),
                         "noise_dropped": int((dropped & is_noise).sum()) if n_noise else 0,
                         "shared_training": shared, **summary})

    trained: dict = {}   # rows kept -> (metrics, summary, per-user metrics): identical training sets train once
    per_user = verdict_applies(cfg, split) is None

    def user_metrics(model, mask: Optional[np.ndarray]):
        """Per-user validation and test ``train.select_metric`` of a model (the verdict's pairs)."""
        if not per_user:
            return None
        kept = None if mask is None else training_rows(cfg.model.kind, split.train, mask)
        ctx_v = None if mask is None else [kept]
        ctx_t = None if mask is None else [kept, split.valid]
        metric = cfg.train.select_metric
        return (per_user_metric(model, split, cfg.evaluate, metric, "valid", context=ctx_v),
                per_user_metric(model, split, cfg.evaluate, metric, "test", context=ctx_t))

    def retrain(variant: str, method: str, mask: np.ndarray, cfg_m: JobConfig):
        key = _mask_key(mask)
        shared = key in trained
        if not shared:
            log.info("%s: %s%s: retraining on %d of %d training interactions", where, variant,
                     f" ({method})" if method else "", int(mask.sum()), n_train)
            metrics, res = retrain_and_evaluate(cfg_m, split, mask, tag=f"{where} {variant_label(variant, method)}")
            trained[key] = (metrics, training_summary(res), user_metrics(res.model, mask))
        else:
            log.info("%s: %s%s: same training rows as an earlier variant, reusing its model", where,
                     variant, f" ({method})" if method else "")
        metrics, summary, users = trained[key]
        record(variant, method, metrics, mask, summary, shared)
        if users is not None:
            out.per_user[variant_label(variant, method)] = users

    log.info("%s: training the base %s model on %d interactions (noise %d)", where, cfg.model.kind,
             n_train, n_noise)
    base = train(cfg_s, split.train, split.valid, tag=f"{where} full",
                 checkpoint_dir=f"{work_dir}/checkpoints/seed-{seed}" if work_dir else None,
                 storage_path=base_storage)
    full_metrics = evaluate_ranking(base.model, split, cfg.evaluate, "test")
    trained[_mask_key(np.ones(n_train, bool))] = (full_metrics, training_summary(base), user_metrics(base.model, None))
    if per_user:
        out.per_user["full"] = trained[_mask_key(np.ones(n_train, bool))][2]
    if "full" in variants:
        record("full", "", full_metrics, None, training_summary(base))

    for label, opts in methods:
        cfg_m = dataclasses.replace(cfg_s, valuation=opts)
        log.info("%s: valuing %d training interactions with %s", where, n_train, label)
        valuation: Valuation = value(cfg_m, split, base, dataset, work_dir=work_dir,
                                     executor=make_executor(cfg_m, use_ray),
                                     store=stores(label) if stores is not None else None, use_ray=use_ray)
        if n_noise:
            nd = noise_detection(valuation.values, is_noise)
            for k in DETECTION_METRICS:
                out.rows.append((int(seed), DETECTION, label, k, float(nd[k])))
        keep, random_keep, keep_all = prune_masks(cfg_m, split, valuation, random_control="random" in variants)
        out.valuations[label] = (valuation, keep)
        out.values[label] = np.asarray(valuation.values, dtype=np.float64)
        out.keep_all[label] = keep_all
        out.dropped[label] = int((~keep).sum())
        if cfg.prune.strategy != "none":
            if "pruned" in variants:
                retrain("pruned", label, keep, cfg_m)
            if "random" in variants:
                retrain("random", label, random_keep, cfg_m)

    if cfg.checks.enabled() and out.values:
        from .checks import checks_executor, lds_of, loo_effects, loo_epochs, loo_of, train_subsets
        executor = checks_executor(cfg, use_ray)
        figures = {label: {} for label in out.values}
        if cfg.checks.lds.subsets > 0:
            log.info("%s: LDS over %d subset models", where, cfg.checks.lds.subsets * cfg.checks.lds.seeds)
            models = train_subsets(cfg_s, split, loo_epochs(cfg_s, base.best_epoch + 1 if base.best_epoch >= 0 else None),
                                   executor, progress=log.info)
            for label, r in lds_of(cfg_s, split, out.values, models).items():
                figures[label] |= {"lds": r["metric"]["lds"], "lds_se": r["metric"]["se"],
                                   "lds_per_user": r["metric"]["per_user"]["mean"],
                                   "lds_loss": r["loss"]["lds"] if "loss" in r else float("nan")}
        if cfg.checks.loo.rows > 0:
            log.info("%s: leave-one-out over %d rows", where, cfg.checks.loo.rows)
            effects = loo_effects(cfg_s, split, loo_epochs(cfg_s, base.best_epoch + 1 if base.best_epoch >= 0 else None),
                                  executor, progress=log.info)
            for label, values in out.values.items():
                r = loo_of(values, effects)
                figures[label] |= {"loo": r["metric"], "loo_loss": r.get("loss", float("nan"))}
        for label, fig in figures.items():
            log.info("%s: checks of %s: %s", where, label,
                     ", ".join(f"{k} {fig[k]:.3f}" for k in CHECK_METRICS if k in fig))
            for k in CHECK_METRICS:
                if k in fig:
                    out.rows.append((int(seed), CHECKS, label, k, float(fig[k])))

    if "oracle" in variants:
        if is_noise is None:
            out.warnings.append("no injected noise: the oracle variant is the full model")
        retrain("oracle", "", ~is_noise if is_noise is not None else np.ones(n_train, bool), cfg_s)
    return out


# ---------------------------------------------------------------------------------------
# the verdict over seeds
# ---------------------------------------------------------------------------------------
def verdict_applies(cfg: JobConfig, split: Split) -> Optional[str]:
    """Why ``recval compare`` gives no verdict (None: it does): see :func:`compare_verdict`."""
    if not cfg.verdict.enabled:
        return "verdict.enabled is false"
    if cfg.prune.strategy == "none" or "pruned" not in compare_variants(cfg):
        return "no pruned variant to decide on (prune.strategy none, or compare.variants without pruned)"
    if cfg.train.select_metric in RATING_METRICS:
        return f"train.select_metric {cfg.train.select_metric} is a rating metric; the verdict ranks"
    if len(split.valid) == 0:
        return "no validation split: the decision is taken on validation"
    return None


def compare_verdict(cfg: JobConfig, outcomes: list, shared_split: bool) -> dict:
    """The decision of a comparison: keep everything, or prune by the compared method whose
    pruning (the job's ``prune`` settings) gains most on validation.

    Per user, each model's ``train.select_metric`` is averaged over the seeds (one split shared by
    every seed, so the same users); the choice and the decision are on validation only (the rule
    of :func:`.core.verdict.decide`: gain > 0 and the lower end of the paired bootstrap CI over
    validation users > 0); the test report: the relative change, its paired bootstrap CI over
    test users, a paired t-test over seeds (per-seed means) and the random pruning of the chosen
    method (``random`` variant) when it ran. Row-level methods only (entity pruning has its
    own removal experiment)."""
    vc = cfg.verdict
    why = verdict_applies(cfg, outcomes[0].split)
    if why is None and not shared_split:
        why = "the split varies with the seed (compare.vary has split or noise): per-user pairs need one split"
    methods = [label for label, (v, _) in outcomes[0].valuations.items() if v.row_entity is None] \
        if why is None else []
    if why is None and not methods:
        why = "no row-level method compared"
    if why is not None:
        return {"decision": None, "skipped": why}
    seeds = [o.seed for o in outcomes]
    metric = cfg.train.select_metric

    def mean_over_seeds(label: str, part: int) -> np.ndarray:
        return np.mean([o.per_user[label][part] for o in outcomes], axis=0)
    full_valid = mean_over_seeds("full", 0)
    candidates = [Candidate(m, float(cfg.prune.fraction), cfg.prune.scope, outcomes[0].dropped[m],
                            float(mean_over_seeds(variant_label("pruned", m), 0).mean())) for m in methods]
    chosen = best_candidate(candidates)
    pruned_valid = mean_over_seeds(variant_label("pruned", chosen.method), 0)
    delta_valid = relative_change(full_valid, pruned_valid)
    v_lo, v_hi = bootstrap_relative_change(full_valid, pruned_valid, vc.bootstrap, vc.confidence, vc.seed)
    a, b = mean_over_seeds("full", 1), mean_over_seeds(variant_label("pruned", chosen.method), 1)
    lo, hi = bootstrap_relative_change(a, b, vc.bootstrap, vc.confidence, vc.seed + 1)

    def per_seed(label: str) -> list:
        return [float(o.per_user[label][1].mean()) for o in outcomes]
    if len(seeds) >= 2:
        _, p = paired_t_test(per_seed("full"), per_seed(variant_label("pruned", chosen.method)))
        test_name = f"paired t-test over {len(seeds)} seeds (per-seed means over test users)"
    else:
        _, p = paired_t_test(a, b)
        test_name = "paired t-test over test users (one seed)"
    rnd = variant_label("random", chosen.method)
    has_random = all(rnd in o.per_user for o in outcomes)
    out = {
        "decision": decide(delta_valid, v_lo), "method": chosen.method, "fraction": chosen.fraction,
        "scope": chosen.scope, "dropped": chosen.dropped, "metric": metric,
        "delta_valid": delta_valid, "valid_ci_low": v_lo, "valid_ci_high": v_hi,
        "delta_test": relative_change(a, b), "ci_low": lo, "ci_high": hi, "p_value": p,
        "confidence": vc.confidence, "seeds": seeds,
        "vs_random": relative_change(a, mean_over_seeds(rnd, 1)) if has_random else None,
        "test_full": float(a.mean()), "test_pruned": float(b.mean()),
        "valid_full": float(full_valid.mean()), "test": test_name,
        "ci": (f"paired percentile bootstrap over {len(a)} test users, {vc.bootstrap} resamples, per-user "
               f"metrics averaged over {len(seeds)} seed(s)"),
        "rule": ("prune when the best method's validation change (per-user metrics averaged over seeds) is > 0 "
                 "and the lower end of its bootstrap CI over validation users is > 0; chosen on validation only"),
        "candidates": [dataclasses.asdict(c) for c in candidates], "methods": methods,
        "per_seed": {"full": per_seed("full"), "pruned": per_seed(variant_label("pruned", chosen.method))},
    }
    if has_random:
        out["test_random"] = float(mean_over_seeds(rnd, 1).mean())
    out["sentence"] = sentence(out)
    return out


# ---------------------------------------------------------------------------------------
# summaries
# ---------------------------------------------------------------------------------------
def _stats(x: np.ndarray) -> dict:
    from .core.stats import over_seeds
    s = over_seeds(x)
    return {"mean": s["mean"], "std": s["std"], "n": s["n"], "values": [float(v) for v in np.asarray(x, float)]}


def comparison_table(rows: list) -> pa.Table:
    cols = list(zip(*rows)) if rows else [[]] * 5
    return pa.Table.from_arrays([pa.array(list(c), type=f.type) for c, f in zip(cols, TABLE_SCHEMA)],
                                schema=TABLE_SCHEMA)


def summarise(table: pa.Table, seeds: list[int]) -> dict:
    """Mean and sample std (ddof=1) over seeds of every (variant, method, metric) of the long
    table, the relative difference to ``full`` paired by seed, and noise detection per method."""
    d = table.to_pydict()
    by: dict = {}
    for s, v, m, k, x in zip(d["seed"], d["variant"], d["method"], d["metric"], d["value"]):
        by.setdefault((v, m), {}).setdefault(k, {})[s] = x
    order = {s: i for i, s in enumerate(seeds)}
    summary, relative, detection, checks = {}, {}, {}, {}
    full = by.get(("full", ""), {})
    for (v, m), metrics in by.items():
        stats = {k: _stats([per[s] for s in sorted(per, key=order.get)]) for k, per in metrics.items()}
        if v == DETECTION:
            detection[m] = stats
            continue
        if v == CHECKS:
            checks[m] = stats
            continue
        label = variant_label(v, m)
        summary[label] = stats
        if v != "full" and full:
            rel = {}
            for k, per in metrics.items():
                common = [s for s in sorted(per, key=order.get) if s in full.get(k, {})]
                diffs = [(per[s] - full[k][s]) / full[k][s] if full[k][s] else float("nan") for s in common]
                rel[k] = _stats(diffs)
            relative[label] = rel
    out = {"summary": summary, "relative_to_full": relative, "noise_detection": detection}
    if checks:
        out["checks"] = checks
    return out


def seed_stability(outcomes: list, shared_split: bool) -> Optional[dict]:
    """Per method, Spearman between the values of every pair of seeds (mean, std, pairs):
    whether a method's values survive a change of training seed. None unless the seeds share
    one split (else their rows differ) and there are two or more."""
    if not shared_split or len(outcomes) < 2:
        return None
    from .core.counterfactual import seed_stability as rho
    out = {}
    for label in outcomes[0].values:
        vals = [o.values[label] for o in outcomes if label in o.values]
        pairs = [rho(vals[a], vals[b]) for a in range(len(vals)) for b in range(a + 1, len(vals))]
        out[label] = {"mean": float(np.nanmean(pairs)) if pairs else float("nan"),
                      "std": float(np.nanstd(pairs, ddof=1)) if len(pairs) > 1 else float("nan"),
                      "pairs": [float(x) for x in pairs]}
    return out


# ---------------------------------------------------------------------------------------
# the comparison run
# ---------------------------------------------------------------------------------------
@dataclass
class CompareResult:
    uri: str
    run_id: str
    metrics: dict
    manifest: dict
    table: pa.Table
    runs: pa.Table


@dataclass
class _Unit:
    """One cell of the comparison (the whole job without a grid): its job, data and outcomes."""
    cell: Optional[Cell]
    cfg: JobConfig
    dataset: object
    shared: Optional[tuple]          # (split, warnings) shared by the seeds, or None
    fixed_data: bool
    outcomes: list = field(default_factory=list)

    @property
    def sub(self) -> tuple:
        """The cell's path component(s) under ``method_values/``, ``splits/``, ``_work/``."""
        return (self.cell.id,) if self.cell is not None else ()


def _section_key(cfg: JobConfig, *sections: str) -> str:
    d = cfg.to_dict()
    return json.dumps([d[s] for s in sections], sort_keys=True, default=str)


def _in_cell(e: Exception, cell: Optional[Cell]) -> Exception:
    if cell is not None and e.args and isinstance(e.args[0], str):
        e.args = (f"compare.grid cell {cell.index + 1} ({cell.label}): {e.args[0]}",) + e.args[1:]
    return e


def _prepare_units(cfg: JobConfig, cells: Optional[list], seeds: list, use_ray: bool) -> list:
    """Load the data and make every split the comparison needs (checked before anything is
    written): per cell, shared by its seeds when neither split nor noise vary with the seed;
    cells with the same data / split / noise sections share one dataset and one split."""
    from .errors import RecvalError

    datasets: dict = {}
    splits: dict = {}
    units = []
    for cell in cells if cells is not None else [None]:
        ccfg = cell.cfg if cell is not None else cfg
        if cell is not None and not cell.runs:
            log.info("compare.grid cell %s (%s): none of compare.variants %s applies, skipped", cell.id,
                     cell.label, ", ".join(cell.skipped))
            continue
        if cell is not None and cell.skipped:
            log.info("compare.grid cell %s (%s): skipping variant(s) %s (they do not apply: no injected "
                     "noise or no pruning)", cell.id, cell.label, ", ".join(cell.skipped))
        try:
            dkey = _section_key(ccfg, "data", "storage")
            if dkey not in datasets:
                datasets[dkey] = load_data(ccfg, use_ray=use_ray)
            dataset = datasets[dkey]
            fixed = not ({"split", "noise"} & set(ccfg.compare.vary))
            shared = None
            if fixed:
                first = seed_config(ccfg, seeds[0])
                skey = dkey + _section_key(first, "split", "noise")
                if skey not in splits:
                    splits[skey] = make_split(first, dataset)
                shared = splits[skey]
            else:  # every seed's split must be valid before anything is written
                for s in seeds:
                    checked = make_split(seed_config(ccfg, s), dataset)
            # every compared method's memory estimate, before any training (pipeline.preflight)
            for _, opts in compared_methods(ccfg):
                preflight(dataclasses.replace(ccfg, valuation=opts), (shared or checked)[0])
        except RecvalError as e:
            raise _in_cell(e, cell)
        units.append(_Unit(cell, ccfg, dataset, shared, fixed))
    return units


def _data_info(u: _Unit, with_warnings: bool = True) -> dict:
    split = u.outcomes[0].split
    d = {"format": u.cfg.data.format, "users": u.dataset.n_users, "items": u.dataset.n_items,
         "train": len(split.train), "valid": len(split.valid), "test": len(split.test),
         "injected_noise": int(split.train.is_noise.sum()) if split.train.is_noise is not None else 0,
         "noise_kind": u.cfg.noise.kind, "split_varies": not u.fixed_data}
    if with_warnings:
        d["warnings"] = list(u.dataset.warnings) + sorted({w for o in u.outcomes for w in o.warnings})
    return d


def _cell_columns(cell: Cell, numeric: list) -> dict:
    """``cell``, one string column per grid key, ``<key>_num`` (float) for numeric keys."""
    cols = {"cell": cell.id}
    cols.update(cell.values)
    for k in numeric:
        cols[f"{k}_num"] = float(cell.overrides[k])
    return cols


def _with_cell_columns(table: pa.Table, cell: Cell, numeric: list) -> pa.Table:
    n = table.num_rows
    arrays, names = [], []
    for name, v in _cell_columns(cell, numeric).items():
        arrays.append(pa.array([v] * n, type=pa.float64() if isinstance(v, float) else pa.string()))
        names.append(name)
    return pa.Table.from_arrays(arrays + table.columns, names=names + table.column_names)


def run_compare(cfg: JobConfig, *, run_id: Optional[str] = None, output_uri: Optional[str] = None,
                overwrite: Optional[bool] = None, use_ray: bool = True,
                address: Optional[str] = None) -> CompareResult:
    """Run the comparison and write its outputs (``manifest.json`` last). With
    ``compare.grid``, every cell is a comparison of its own (see :mod:`recval_ray.grid`)."""
    from .output import WORK
    from .core.executor import ShardStore
    from .errors import ConfigError

    check_compare(cfg, running=True)
    cells = grid_cells(cfg) if cfg.compare.grid else None
    for cell in cells or []:
        try:
            check_compare(cell.cfg, running=True)
        except ConfigError as e:
            raise _in_cell(e, cell)
    timings: dict = {}
    t_all = time.perf_counter()
    run_id = run_id or (f"{cfg.output.run_id}-compare" if cfg.output.run_id else f"{cfg.name}-compare")
    out, on_cluster = open_run(cfg, run_id, output_uri, overwrite, use_ray, address)
    with out:
        seeds = list(cfg.compare.seeds)
        t = time.perf_counter()
        units = _prepare_units(cfg, cells, seeds, use_ray)
        timings["ingest_split_s"] = time.perf_counter() - t
        if cells is None:
            log.info("comparing %s over seeds %s (varying %s): variants %s, methods %s", cfg.model.kind, seeds,
                     ", ".join(cfg.compare.vary), ", ".join(compare_variants(cfg)),
                     ", ".join(label for label, _ in compared_methods(cfg)) or "none")
        else:
            log.info("comparing %d cells of compare.grid (%s) over seeds %s (varying %s)", len(units),
                     ", ".join(grid_keys(cfg.compare.grid)), seeds, ", ".join(cfg.compare.vary))

        work_dir = tempfile.mkdtemp(prefix=f"recval-{run_id}-")
        try:
            for k, u in enumerate(units):
                if u.cell is not None:
                    log.info("cell %d of %d: %s [%s]: variants %s, methods %s", k + 1, len(units), u.cell.label,
                             u.cell.id, ", ".join(compare_variants(u.cfg)),
                             ", ".join(label for label, _ in compared_methods(u.cfg)) or "none")
                cell_dir = os.path.join(work_dir, *u.sub)
                os.makedirs(cell_dir, exist_ok=True)
                for i, s in enumerate(seeds):
                    t = time.perf_counter()
                    log.info("seed %d of %d (seed %d)%s", i + 1, len(seeds), s,
                             f", cell {u.cell.id}" if u.cell is not None else "")
                    position = f" ({i + 1} of {len(seeds)})" + (f" cell {u.cell.id}" if u.cell is not None else "")
                    outcome = compare_seed(
                        u.cfg, u.dataset, s, position=position, shared_split=u.shared,
                        use_ray=use_ray, work_dir=cell_dir,
                        stores=lambda label, s=s, sub=u.sub: ShardStore(out.fs, out.root_path(WORK, *sub, f"seed-{s}", label)),
                        base_storage=out.attempt_uri("checkpoints", *u.sub, f"seed-{s}") if on_cluster else None)
                    if i > 0:   # only the first seed's valuations are written (their values stay: seed stability)
                        outcome.valuations, outcome.keep_all = {}, {}
                    u.outcomes.append(outcome)
                    timings[f"{u.cell.id}_seed_{s}_s" if u.cell is not None else f"seed_{s}_s"] = time.perf_counter() - t
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)

        if cells is None:
            u = units[0]
            table = comparison_table([r for o in u.outcomes for r in o.rows])
            runs = pa.Table.from_pylist([r for o in u.outcomes for r in o.runs])
            metrics = {
                "kind": "compare", "model": cfg.model.kind,
                "methods": [label for label, _ in compared_methods(cfg)], "variants": compare_variants(cfg),
                "seeds": seeds, "vary": list(cfg.compare.vary), "std": STD_NOTE, "data": _data_info(u),
                "prune": _prune_info(cfg), **summarise(table, seeds), "runs": runs.to_pylist(),
                "valuation": {label: dict(v.info) for label, (v, _) in u.outcomes[0].valuations.items()},
                "verdict": compare_verdict(cfg, u.outcomes, u.shared is not None),
            }
            stability = seed_stability(u.outcomes, u.shared is not None)
            if stability is not None:
                metrics["seed_stability"] = stability
        else:
            table, runs, metrics = _grid_results(cfg, cells, units, seeds)

        t = time.perf_counter()
        log.info("writing outputs to %s", out.uri)
        out.write_table("comparison", table, use_ray=use_ray)
        out.write_table("comparison_runs", runs, use_ray=use_ray)
        values_tabs: dict = {}
        for u in units:
            first = u.outcomes[0]
            tabs = values_tabs.setdefault(u.cell.id, {}) if u.cell is not None else values_tabs
            for label, (valuation, keep) in first.valuations.items():
                tabs[label] = values_table(u.dataset, first.split, valuation, keep,
                                           keep_all=first.keep_all.get(label))
                out.write_table("/".join(["method_values", *u.sub, label]), tabs[label], use_ray=use_ray)
            for name, part in first.split.parts().items():
                out.write_table("/".join(["splits", *u.sub, name]), interactions_table(u.dataset, part), use_ray=use_ray)
        out.write_json("metrics.json", metrics)
        if cfg.output.report:
            from .report_builder import build_compare_report
            out.write_text("report.html", build_compare_report(cfg, run_id, metrics, values_tabs))
        timings["write_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t_all
        manifest = out.complete(kind="compare", config=cfg.to_dict(), timings=timings)
    return CompareResult(uri=out.uri, run_id=run_id, metrics=metrics, manifest=manifest, table=table,
                         runs=runs)


STD_NOTE = "sample standard deviation over seeds (ddof=1); NaN with one seed"


def _prune_info(cfg: JobConfig) -> dict:
    return {"strategy": cfg.prune.strategy, "scope": cfg.prune.scope, "fraction": cfg.prune.fraction,
            "count": cfg.prune.count}


def _grid_results(cfg: JobConfig, cells: list, units: list, seeds: list) -> tuple:
    """(long table, runs table, metrics.json) of a grid: the cell columns on every row, the
    summary per cell in ``cells``."""
    keys = grid_keys(cfg.compare.grid)
    numeric = numeric_keys(keys)
    by_cell = {u.cell.id: u for u in units}
    tables, run_rows, entries = [], [], []
    methods, variants = [], []
    for cell in cells:
        entry = {"cell": cell.id, "index": cell.index, "label": cell.label, "overrides": cell.overrides,
                 "values": cell.values, "skipped_variants": list(cell.skipped)}
        u = by_cell.get(cell.id)
        if u is None:
            entries.append(entry | {"ran": False})
            continue
        t = comparison_table([r for o in u.outcomes for r in o.rows])
        labels = [label for label, _ in compared_methods(u.cfg)]
        cell_variants = compare_variants(u.cfg)
        methods += [m for m in labels if m not in methods]
        variants += [v for v in cell_variants if v not in variants]
        entry.update({"ran": True, "model": u.cfg.model.kind, "methods": labels, "variants": cell_variants,
                      "data": _data_info(u, with_warnings=False), "prune": _prune_info(u.cfg),
                      **summarise(t, seeds),
                      "valuation": {label: dict(v.info) for label, (v, _) in u.outcomes[0].valuations.items()},
                      "verdict": compare_verdict(u.cfg, u.outcomes, u.shared is not None)})
        stability = seed_stability(u.outcomes, u.shared is not None)
        if stability is not None:              # per cell: each cell's methods value its own rows
            entry["seed_stability"] = stability
        entries.append(entry)
        tables.append(_with_cell_columns(t, cell, numeric))
        cols = _cell_columns(cell, numeric)
        run_rows += [{**cols, **r} for o in u.outcomes for r in o.runs]
    first = units[0]
    warnings = sorted({w for u in units for w in list(u.dataset.warnings)
                       + [w for o in u.outcomes for w in o.warnings]})
    metrics = {
        "kind": "compare", "model": cfg.model.kind,
        "models": list(dict.fromkeys(u.cfg.model.kind for u in units)),
        "methods": methods, "variants": variants, "seeds": seeds, "vary": list(cfg.compare.vary),
        "std": STD_NOTE,
        "grid": {"keys": list(keys), "mode": cfg.compare.grid_mode,
                 "values": {k: list(dict.fromkeys(c.values[k] for c in cells)) for k in keys},
                 "numeric": numeric},
        "data": _data_info(first, with_warnings=False) | {"warnings": warnings},
        "prune": _prune_info(cfg),
        "cells": entries,
        "runs": run_rows,
    }
    return pa.concat_tables(tables), pa.Table.from_pylist(run_rows), metrics


def fmt_mean_std(stats: dict, digits: int = 4) -> str:
    m, s = stats["mean"], stats["std"]
    return f"{m:.{digits}f}" + ("" if math.isnan(s) else f" +- {s:.{digits}f}")


def headline(result: CompareResult) -> str:
    """Terminal lines: where the outputs are, mean +- std per variant, noise detection."""
    m = result.metrics
    if "cells" in m:
        return _grid_headline(result)
    summary = m["summary"]
    first = next(iter(summary.values()), {})
    keys = [k for k in first if k.startswith(("recall@", "ndcg@"))][:4] or list(first)[:4]
    w = max([len(k) for k in summary] + [7]) + 2
    lines = [f"comparison {result.run_id} complete: {result.uri}",
             f"test metrics, mean +- std over seeds {m['seeds']}:",
             f"{'variant':<{w}}" + "".join(f"{k:>20}" for k in keys)]
    for label, stats in summary.items():
        lines.append(f"{label:<{w}}" + "".join(f"{fmt_mean_std(stats[k]):>20}" for k in keys if k in stats))
    for method, nd in m.get("noise_detection", {}).items():
        lines.append(f"noise detection ({method}): AUC {fmt_mean_std(nd['auc'])}, precision@"
                     f"{m['data']['injected_noise']} {fmt_mean_std(nd['precision_at_n'])}")
    v = m.get("verdict")
    if v:
        lines.append(f"verdict: {v['sentence']}" if v.get("decision") else f"verdict: not computed ({v['skipped']})")
    return "\n".join(lines)


def _grid_headline(result: CompareResult) -> str:
    m = result.metrics
    ran = [c for c in m["cells"] if c.get("ran")]
    first = next((st for c in ran for st in c["summary"].values()), {})
    keys = [k for k in first if k.startswith(("recall@", "ndcg@"))][:4] or list(first)[:4]
    w = max([len(v) for c in ran for v in c["summary"]] + [7]) + 4
    lines = [f"comparison {result.run_id} complete: {result.uri}",
             f"test metrics, mean +- std over seeds {m['seeds']}, per cell of compare.grid "
             f"({', '.join(m['grid']['keys'])}, {m['grid']['mode']}):",
             f"{'variant':<{w}}" + "".join(f"{k:>20}" for k in keys)]
    for c in m["cells"]:
        lines.append(f"[{c['cell']}] {c['label']}" + ("" if c.get("ran") else
                                                       f": skipped ({', '.join(c['skipped_variants'])} do not apply)"))
        for label, stats in c.get("summary", {}).items():
            lines.append(f"  {label:<{w - 2}}" + "".join(f"{fmt_mean_std(stats[k]):>20}" for k in keys if k in stats))
        for method, nd in c.get("noise_detection", {}).items():
            lines.append(f"  noise detection ({method}): AUC {fmt_mean_std(nd['auc'])}")
        v = c.get("verdict")
        if v and v.get("decision"):
            lines.append(f"  verdict: {v['sentence']}")
    return "\n".join(lines)
