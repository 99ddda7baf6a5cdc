"""``recval sweep``: a Ray Tune sweep over any keys of the job (the ``tune:`` section).

This module is Ray-free: the ``tune:`` checks, the search space (dotted config key ->
distribution), applying a trial's overrides to the job, one trial (the pipeline's stages for
one configuration, returning its metrics), the trials table and the choice of the best trial
(on validation only). :mod:`recval_ray.ray_layer.tune` runs the trials on Ray Tune;
:func:`run_sweep` ties both together and writes the outputs.

A trial (:func:`run_trial`): the job with the trial's overrides applied (validated like any
job), the split shared by every trial (put once in Ray's object store) unless a ``data.``,
``split.`` or ``noise.`` key is swept, the base model trained in-process (never Ray Train),
then for ``objective: pruned`` valued, pruned (no random control) and retrained. The
objective is ``tune.metric`` on the VALIDATION split (training items excluded: the full
training set, whatever was pruned, so every trial ranks the same candidates); the test
metrics of the same model are reported alongside and never used to choose.

Outputs (``<output.uri>/<run id>/``, run id ``<name>-sweep`` unless given; ``manifest.json``
last): ``trials/`` (one row per trial), ``best_config.yaml`` (the best trial's full job,
loadable by ``recval run``), ``best/`` (that job run by the normal pipeline), ``metrics.json``,
``report.html``. Tune's own state lives in ``_tune/<experiment>/`` under a local run (a
deterministic temp dir for remote outputs); the experiment name hashes the job and the space,
so rerunning the same run id (an interrupted sweep, or ``--overwrite`` of a complete one)
resumes it and never reruns a finished trial.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from .errors import ConfigError
from .report import fmt_value  # noqa: F401 - names, tables, labels (also imported from here)

log = logging.getLogger("recval_ray")

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
# sections a trial may not change: what names, stores and schedules the sweep itself
REFUSED_ROOTS = ("name", "tune", "output", "ray", "storage", "compare")
# a trial's data: swept keys under these sections make every trial load and split itself
DATA_ROOTS = ("data", "split", "noise")
DEFAULT_GRIDS = {"prune.fraction": [0.05, 0.1, 0.2, 0.3],
                 "train.denoise.tau": [0.05, 0.1, 0.2, 0.5],
                 "train.denoise.pool": [2, 5, 10]}
SPACE_HELP = ("{grid: [v, ...]}, {choice: [v, ...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]} "
              "or {randint: [lo, hi]} (hi excluded)")


# ---------------------------------------------------------------------------------------
# the space
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dimension:
    """One swept key: ``kind`` in :data:`DISTRIBUTIONS`; ``values`` (grid, choice) or
    ``(lo, hi)`` bounds (uniform, loguniform, randint with ``hi`` excluded)."""
    key: str
    kind: str
    values: tuple

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"

    def spec(self) -> dict:
        return {self.kind: list(self.values)}


def _plain(v: Any) -> Any:
    """numpy scalars (Tune samples them) as Python values, so config validation accepts them."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _lookup(raw: dict, key: str) -> tuple[bool, Any]:
    node: Any = raw
    for p in key.split("."):
        if not isinstance(node, dict) or p not in node:
            return False, None
        node = node[p]
    return True, node


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """A trial's ``key: value``: the one override mechanism (:func:`recval_ray.config.set_dotted`)."""
    from .schema import set_dotted as assign
    assign(raw, key, _plain(value))


def apply_overrides(cfg, overrides: dict, *, keep_tune: bool = True):
    """The job ``cfg`` with ``{dotted key: value}`` applied and validated like any job (a
    ``ConfigError`` names the key). ``keep_tune=False`` drops the ``tune`` section (checks)."""
    from .schema import validate_schema as validate_config
    raw = cfg.to_dict()
    if not keep_tune:
        raw.pop("tune", None)
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    return validate_config(raw)


def parse_dimension(key: Any, spec: Any, cfg) -> Dimension:
    """Check one ``tune.space`` entry against the job ``cfg``: the key must be a leaf of the
    job config (defaults included) outside :data:`REFUSED_ROOTS`, the distribution one of
    :data:`DISTRIBUTIONS`, and its values (grid, choice) or bounds valid for the key."""
    where = f"tune.space.{key}"
    if not isinstance(key, str) or not key.strip() or any(not p for p in key.split(".")):
        raise ConfigError(f"tune.space: key {key!r} is not a dotted config key (e.g. prune.fraction)")
    root = key.split(".")[0]
    if root in REFUSED_ROOTS:
        raise ConfigError(f"{where}: the {root!r} section cannot be swept "
                          f"(swept keys must be outside {', '.join(REFUSED_ROOTS)})")
    found, current = _lookup(cfg.to_dict(), key)
    if not found:
        raise ConfigError(f"{where}: unknown key: {key} is not a key of the job config")
    if isinstance(current, dict):
        raise ConfigError(f"{where}: {key} is a section; sweep one of its keys "
                          f"({', '.join(f'{key}.{k}' for k in current)})")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: expected one of {SPACE_HELP}, got {spec!r}")
    kind, vals = next(iter(spec.items()))
    if not isinstance(vals, list) or not vals:
        raise ConfigError(f"{where}.{kind}: expected a non-empty list, got {vals!r}")
    if kind in ("uniform", "loguniform", "randint"):
        num = (int,) if kind == "randint" else (int, float)
        if len(vals) != 2 or any(isinstance(v, bool) or not isinstance(v, num) for v in vals):
            what = "integers" if kind == "randint" else "numbers"
            raise ConfigError(f"{where}.{kind}: expected [lo, hi], two {what}, got {vals!r}")
        lo, hi = vals
        if not lo < hi:
            raise ConfigError(f"{where}.{kind}: [{lo}, {hi}]: lo must be below hi")
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"{where}.loguniform: [{lo}, {hi}]: bounds must be positive")
        if not all(math.isfinite(v) for v in vals):
            raise ConfigError(f"{where}.{kind}: bounds must be finite, got {vals!r}")
        checked = [lo, hi - 1] if kind == "randint" else [float(lo), float(hi)]
    else:
        checked = list(vals)
        if kind == "grid":
            dup = [v for i, v in enumerate(vals) if v in vals[:i]]
            if dup:
                raise ConfigError(f"{where}.grid: {dup[0]!r} listed twice")
    for v in checked:   # every value (bound) must give a valid job
        try:
            apply_overrides(cfg, {key: v}, keep_tune=False)
        except ConfigError as e:
            raise ConfigError(f"{where}.{kind}: value {v!r} is not valid here: {e}") from None
    return Dimension(key, kind, tuple(_plain(v) for v in vals))


def flatten_space(space: dict, cfg, prefix: str = "") -> dict:
    """``tune.space`` with entries nested under a section of the job flattened into dotted
    keys, so ``--set tune.space.prune.fraction={grid: [0.1, 0.2]}`` (nested by the dots of
    ``--set``) is the key ``prune.fraction``."""
    out = {}
    for k, v in space.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        is_spec = isinstance(v, dict) and len(v) == 1 and next(iter(v)) in DISTRIBUTIONS
        found, current = _lookup(cfg.to_dict(), key)
        if isinstance(v, dict) and v and not is_spec and found and isinstance(current, dict):
            out.update(flatten_space(v, cfg, key))
        else:
            out[key] = v
    return out


def default_space(cfg) -> dict:
    """The space when ``tune.space`` is empty: ``prune.fraction`` (with
    ``prune.strategy: fraction``) and PLD's ``tau`` and ``pool`` (``train.denoise.kind: pld``)."""
    out = {}
    if cfg.prune.strategy == "fraction":
        out["prune.fraction"] = {"grid": DEFAULT_GRIDS["prune.fraction"]}
    if cfg.train.denoise.kind == "pld":
        out["train.denoise.tau"] = {"grid": DEFAULT_GRIDS["train.denoise.tau"]}
        out["train.denoise.pool"] = {"grid": DEFAULT_GRIDS["train.denoise.pool"]}
    return out


def sweep_space(cfg) -> list[Dimension]:
    """The swept dimensions of the job: ``tune.space`` or :func:`default_space`."""
    space = flatten_space(cfg.tune.space, cfg) or default_space(cfg)
    if not space:
        raise ConfigError("tune.space: empty, and no default applies (prune.strategy is not "
                          "'fraction' and train.denoise.kind is not 'pld'); give the keys to sweep")
    return [parse_dimension(k, v, cfg) for k, v in space.items()]


def objective_kind(cfg) -> str:
    """``pruned`` or ``base``: ``tune.objective``, ``auto`` resolved by ``prune.strategy``."""
    if cfg.tune.objective != "auto":
        return cfg.tune.objective
    return "pruned" if cfg.prune.strategy != "none" and cfg.prune.retrain else "base"


def objective_mode(cfg) -> str:
    return cfg.tune.mode or "max"   # every ranking metric is higher-is-better


def metric_name(cfg) -> str:
    """``tune.metric`` as the evaluation names it (``recall@20``, ``map`` for the full ranking)."""
    from .core.metrics import parse_metric
    base, k = parse_metric(cfg.tune.metric)
    return base if k is None else f"{base}@{k}"


def check_tune(cfg) -> None:
    """The ``tune`` section: settings, metric and every ``tune.space`` entry (an empty space is
    only an error when a sweep runs: :func:`sweep_space`)."""
    t = cfg.tune
    from .core.metrics import parse_metric
    try:
        parse_metric(t.metric)
    except ValueError as e:
        raise ConfigError(f"tune.metric: {e}") from None
    for name, ok, rule in (("num_samples", t.num_samples >= 1, ">= 1"),
                           ("grace_period", t.grace_period >= 1, ">= 1"),
                           ("reduction_factor", t.reduction_factor >= 2, ">= 2"),
                           ("max_t", t.max_t == 0 or t.max_t >= t.grace_period, "0 (auto) or >= grace_period"),
                           ("max_concurrent", t.max_concurrent >= 0, ">= 0 (0: from the cluster's CPUs)"),
                           ("trial_cpus", t.trial_cpus > 0, "> 0"),
                           ("trial_gpus", t.trial_gpus >= 0, ">= 0")):
        if not ok:
            raise ConfigError(f"tune.{name}: {getattr(t, name)} must be {rule}")
    if t.objective == "pruned" and (cfg.prune.strategy == "none" or not cfg.prune.retrain):
        raise ConfigError("tune.objective: 'pruned' needs pruning and retraining (prune.strategy is "
                          f"{cfg.prune.strategy!r}, prune.retrain {cfg.prune.retrain}); use 'base'")
    if not isinstance(t.space, dict):
        raise ConfigError("tune.space: expected a mapping of dotted config keys to distributions")
    for key, spec in flatten_space(t.space, cfg).items():
        parse_dimension(key, spec, cfg)


def grid_size(dims: list[Dimension], num_samples: int) -> int:
    """Trials of the sweep: the product of the grids, times ``num_samples``."""
    n = 1
    for d in dims:
        if d.is_grid:
            n *= len(d.values)
    return n * num_samples


def experiment_name(cfg, dims: list[Dimension]) -> str:
    """``sweep-<hash>`` of everything that decides the trials' results: the job (without
    where and how it runs) and the space, so a changed job never reuses old trials."""
    raw = cfg.to_dict()
    for k in ("output", "ray", "storage", "compare"):
        raw.pop(k, None)
    tune = raw.pop("tune")
    for k in ("max_concurrent", "trial_cpus", "trial_gpus"):
        tune.pop(k, None)
    tune["space"] = {d.key: d.spec() for d in dims}
    text = json.dumps({"job": raw, "tune": tune}, sort_keys=True, default=str)
    return "sweep-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def max_epochs(cfg, dims: list[Dimension]) -> int:
    """The most epochs any trial trains (``train.epochs`` or its swept values)."""
    for d in dims:
        if d.key == "train.epochs":
            return int(max(d.values[:2] if d.kind in ("uniform", "loguniform", "randint") else d.values))
    return int(cfg.train.epochs)


# ---------------------------------------------------------------------------------------
# trials
# ---------------------------------------------------------------------------------------
def trial_name(index: int, overrides: dict) -> str:
    """``t003_prune.fraction=0.1_model.dim=16``: the trial's position in Tune's (deterministic)
    generation order and its overrides, file-name safe."""
    import re
    parts = [f"{k}={fmt_value(v)}" for k, v in overrides.items()]
    text = re.sub(r"[^A-Za-z0-9.=,_+-]", "-", "_".join(parts))[:150]
    return f"t{index:03d}" + (f"_{text}" if text else "")


def trial_config(cfg, overrides: dict):
    """The job one trial runs: overrides applied; trained in-process (a trial holds its own
    CPUs / GPU share: no Ray Train inside), no random control (only the objective counts)."""
    out = apply_overrides(cfg, overrides)
    out.train.workers = 0
    out.train.use_gpu = False
    out.prune.random_control = False
    return out


def shares_data(dims: list[Dimension]) -> bool:
    """True when no swept key changes the data, the split or the injected noise."""
    return not any(d.key.split(".")[0] in DATA_ROOTS for d in dims)


def valid_score(cfg, model, split, metric: str, context=None) -> float:
    """``metric`` of ``model`` on the validation split, the full training set excluded."""
    from .core.evaluation import evaluate_ranking
    from .core.metrics import parse_metric
    base, k = parse_metric(metric)
    ev = dataclasses.replace(cfg.evaluate, metrics=[metric if k is not None else f"{base}_full"], ks=[])
    out = evaluate_ranking(model, split, ev, "valid", exclude=[split.train],
                           context=context if context is not None else [split.train])
    return float(out[metric])


class EpochReporter:
    """``on_epoch`` hook of the trainer: the validation objective of every epoch, and the
    best so far (what early stopping would select), handed to ``report`` (ASHA's rungs).
    Validates only where the trainer does (every ``train.eval_every``-th epoch); the epochs
    between report the best so far without ``valid_epoch`` (NaN before the first
    validation: ASHA lets a trial pass a rung it reaches with NaN)."""

    def __init__(self, cfg, split, metric: str, mode: str, report: Callable[[dict], None], context=None):
        self.cfg, self.split, self.metric, self.report = cfg, split, metric, report
        self.sign = 1.0 if mode == "max" else -1.0
        self.context = context
        self.best = -math.inf

    def __call__(self, record: dict, task) -> None:
        every = max(1, int(getattr(self.cfg.train, "eval_every", 1)))
        if (int(record["epoch"]) + 1) % every:
            best = self.sign * self.best if math.isfinite(self.best) else float("nan")
            self.report({"objective": best, "epoch": int(record["epoch"]) + 1, "final": 0})
            return
        score = valid_score(self.cfg, task.model, self.split, self.metric, self.context)
        if math.isfinite(score) and self.sign * score > self.best:
            self.best = self.sign * score
        best = self.sign * self.best if math.isfinite(self.best) else float("nan")
        self.report({"objective": best, "valid_epoch": score, "epoch": int(record["epoch"]) + 1, "final": 0})


def run_trial(cfg, overrides: dict, *, data=None, report_epoch: Optional[Callable[[dict], None]] = None
              ) -> dict:
    """Run one trial: the job ``cfg`` with ``overrides``; ``data`` = ``(dataset, split)``
    shared by the trials (None: load and split here). ``report_epoch``: receives the
    per-epoch objective (base model for ``objective: base``, else the retrained model).
    Returns the final result: ``objective`` (``tune.metric`` on validation),
    ``valid_<metric>``, ``test_<m>`` for every evaluation metric of the same model, and the
    training summaries; ``final: 1``."""
    from .core.evaluation import evaluate_ranking, noise_detection
    from .pipeline import load_data, make_split, prune_masks, retrain_and_evaluate, train, value

    t0 = time.perf_counter()
    tcfg = trial_config(cfg, overrides)
    if data is None:
        dataset = load_data(tcfg, use_ray=False)
        split, _ = make_split(tcfg, dataset)
    else:
        dataset, split = data
    kind, metric, mode = objective_kind(cfg), metric_name(cfg), objective_mode(cfg)
    hook = EpochReporter(tcfg, split, metric, mode, report_epoch) \
        if report_epoch is not None and kind == "base" else None
    base = train(tcfg, split.train, split.valid, tag="trial base", on_epoch=hook)
    base_valid = valid_score(tcfg, base.model, split, metric)
    out = {"base_valid": base_valid, "base_best_epoch": int(base.best_epoch),
           "base_epochs_run": int(base.epochs_run)}
    if kind == "base":
        test = evaluate_ranking(base.model, split, tcfg.evaluate, "test")
        objective, res = base_valid, base
    else:
        valuation = value(tcfg, split, base, dataset)
        keep, _, _ = prune_masks(tcfg, split, valuation, random_control=False)
        kept = split.train.take(keep)
        hook = EpochReporter(tcfg, split, metric, mode, report_epoch, context=[kept]) \
            if report_epoch is not None else None
        test, res = retrain_and_evaluate(tcfg, split, keep, tag="trial pruned", on_epoch=hook)
        objective = valid_score(tcfg, res.model, split, metric, context=[kept])
        out["dropped"] = int((~keep).sum())
        is_noise = split.train.is_noise
        if is_noise is not None and is_noise.any():
            out["noise_dropped"] = int((~keep & is_noise).sum())
            out["noise_auc"] = float(noise_detection(valuation.values, is_noise)["auc"])
    out.update({"objective": objective, f"valid_{metric}": objective,
                "best_epoch": int(res.best_epoch), "epochs_run": int(res.epochs_run)})
    out.update({f"test_{k}": float(v) for k, v in test.items()})
    out["trial_seconds"] = round(time.perf_counter() - t0, 3)
    out["final"] = 1
    return out


# ---------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------
@dataclass
class TrialRow:
    """One trial as read back from Tune: its name, overrides and last result."""
    name: str
    overrides: dict
    result: dict = field(default_factory=dict)
    error: Optional[str] = None

    @property
    def status(self) -> str:
        if self.error:
            return "error"
        if self.result.get("final") == 1:
            return "complete"
        return "stopped" if self.result else "pending"   # stopped early by the scheduler


def trials_table_rows(trials: list[TrialRow], dims: list[Dimension], metric: str) -> list[dict]:
    """One dict per trial: ``trial``, every swept key, ``valid_<metric>`` (the objective), the
    test metrics, ``status``, ``seconds`` and the training summaries (None where absent)."""
    test_keys: list[str] = []
    extra = ("base_valid", "best_epoch", "epochs_run", "dropped", "noise_dropped", "noise_auc")
    for t in trials:
        for k in t.result:
            if k.startswith("test_") and k not in test_keys:
                test_keys.append(k)
    rows = []
    for t in trials:
        r = t.result
        final = t.status == "complete"
        row = {"trial": t.name}
        for d in dims:
            row[d.key] = t.overrides.get(d.key)
        row[f"valid_{metric}"] = float(r["objective"]) if "objective" in r else float("nan")
        for k in test_keys:
            row[k] = float(r[k]) if final and k in r else float("nan")
        row["status"] = t.status
        row["seconds"] = float(r.get("time_total_s", r.get("trial_seconds", float("nan"))))
        row["iterations"] = int(r.get("training_iteration", 0))
        for k in extra:
            row[k] = r.get(k) if final else None
        row["finished_at"] = float(r["timestamp"]) if "timestamp" in r else float("nan")
        row["error"] = t.error
        rows.append(row)
    return rows


def select_best(rows: list[dict], objective_column: str, mode: str) -> Optional[dict]:
    """The best completed trial on the VALIDATION objective (``objective_column``); test
    columns are never read. Ties: the first in trial order. None when no trial completed."""
    sign = 1.0 if mode == "max" else -1.0
    best, best_score = None, -math.inf
    for r in rows:
        v = r.get(objective_column)
        if r.get("status") != "complete" or v is None or not math.isfinite(float(v)):
            continue
        if sign * float(v) > best_score:
            best, best_score = r, sign * float(v)
    return best


def table_from_rows(rows: list[dict], dims: list[Dimension]):
    """``trials/``: a pyarrow table of :func:`trials_table_rows` (a swept key of mixed or
    nested values becomes text)."""
    import pyarrow as pa
    cols: dict = {}
    names = list(rows[0]) if rows else ["trial"] + [d.key for d in dims] + ["status"]
    for name in names:
        vals = [r.get(name) for r in rows]
        try:
            arr = pa.array(vals)
            if pa.types.is_null(arr.type):
                arr = pa.array(vals, pa.string())
            elif pa.types.is_nested(arr.type) or pa.types.is_struct(arr.type):
                raise pa.ArrowInvalid("nested")
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arr = pa.array([None if v is None else fmt_value(v) for v in vals], pa.string())
        cols[name] = arr
    return pa.table(cols)


def _stats(x: list) -> dict:
    a = np.asarray([v for v in x if v is not None and math.isfinite(v)], dtype=float)
    if not len(a):
        return {"n": 0}
    return {"n": int(len(a)), "min": float(a.min()), "max": float(a.max()), "mean": float(a.mean()),
            "median": float(np.median(a))}


def summarise(rows: list[dict], dims: list[Dimension], objective_column: str, mode: str) -> dict:
    """The objective over completed trials, and per value of each grid/choice key its best
    and mean objective (``by_key``)."""
    done = [r for r in rows if r["status"] == "complete"]
    pick = max if mode == "max" else min
    by_key = {}
    for d in dims:
        if d.kind not in ("grid", "choice"):
            continue
        per = {}
        for v in d.values:
            vals = [r[objective_column] for r in done if r[d.key] == v and math.isfinite(r[objective_column])]
            per[fmt_value(v)] = {"n": len(vals), "best": pick(vals) if vals else None,
                                 "mean": float(np.mean(vals)) if vals else None}
        by_key[d.key] = per
    counts: dict = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {"objective": _stats([r[objective_column] for r in done]), "status": counts, "by_key": by_key}


def best_config_yaml(best_cfg) -> str:
    import yaml
    header = ("# the best trial's job of a recval sweep (every key, defaults included):\n"
              "# recval run this file to reproduce it\n")
    return header + yaml.safe_dump(best_cfg.to_dict(), sort_keys=False, default_flow_style=None)


# ---------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------
