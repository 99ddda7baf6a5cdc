"""``recval sweep``: the job around the sweep library (:mod:`recval_ray.sweep`): trials on Ray
Tune (:mod:`recval_ray.ray_layer.tune`), the best configuration through the pipeline, outputs.

The library (spaces, trials, tables) is what the Ray layer runs; this module runs the Ray layer,
so neither imports the other back.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

from .sweep import (best_config_yaml, experiment_name, fmt_value, grid_size, metric_name,  # noqa: F401
                    objective_kind, objective_mode, select_best, shares_data, summarise, sweep_space,
                    table_from_rows, trials_table_rows, apply_overrides)

log = logging.getLogger("recval_ray")


@dataclass
class SweepResult:
    uri: str
    run_id: str
    metrics: dict
    manifest: dict
    rows: list
    best_config: Any


def run_sweep(cfg, *, run_id: Optional[str] = None, output_uri: Optional[str] = None,
              overwrite: Optional[bool] = None, address: Optional[str] = None) -> SweepResult:
    """Run the sweep on Ray Tune, then the best configuration through the normal pipeline,
    and write the outputs (``manifest.json`` last)."""
    import posixpath
    import tempfile

    from . import fs as rfs
    from .pipeline import load_data, make_split, open_run, run_job
    from .ray_layer.tune import TUNE_DIR, run_tune

    t_all = time.perf_counter()
    timings: dict = {}
    dims = sweep_space(cfg)                       # bad space: an error before anything is written
    kind, metric, mode = objective_kind(cfg), metric_name(cfg), objective_mode(cfg)
    run_id = run_id or f"{cfg.output.run_id or cfg.name}-sweep"
    out, on_cluster = open_run(cfg, run_id, output_uri, overwrite, True, address)
    with out:
        t = time.perf_counter()
        dataset = load_data(cfg, use_ray=True)
        split, warnings = make_split(cfg, dataset)    # the data must be valid before anything is written
        timings["ingest_split_s"] = time.perf_counter() - t
        exp = experiment_name(cfg, dims)
        local = not rfs.is_remote(out.uri)
        if local:
            storage = out.root_path(TUNE_DIR)
        else:
            storage = posixpath.join(tempfile.gettempdir(), "recval-tune",
                                     hashlib.sha256(out.uri.encode()).hexdigest()[:16])
        n = grid_size(dims, cfg.tune.num_samples)
        log.info("sweep %s: %d trial(s) over %s; objective %s %s on validation (%s model); Tune storage %s",
                 run_id, n, ", ".join(f"{d.key} ({d.kind})" for d in dims), mode, metric, kind,
                 posixpath.join(storage, exp))
        if kind == "base" and dims and all(d.key.startswith("prune.") or d.key.startswith("valuation.") for d in dims):
            log.warning("objective 'base': the swept keys (%s) do not change the base model",
                        ", ".join(d.key for d in dims))
        if cfg.train.use_gpu and cfg.tune.trial_gpus <= 0:
            log.warning("train.use_gpu: trials train in-process on their own resources; give "
                        "tune.trial_gpus to train them on a GPU")

        t = time.perf_counter()
        shared = (dataset, split) if shares_data(dims) else None
        trials = run_tune(cfg, dims, storage=storage, name=exp, data=shared, on_cluster=on_cluster, total=n)
        timings["sweep_s"] = time.perf_counter() - t
        rows = trials_table_rows(trials, dims, metric)
        objective_column = f"valid_{metric}"
        best = select_best(rows, objective_column, mode)
        if best is None:
            errors = [r["error"] for r in rows if r.get("error")]
            raise RuntimeError(f"sweep {run_id}: no trial completed"
                               + (f"; first error: {errors[0]}" if errors else ""))
        best_trial = next(t for t in trials if t.name == best["trial"])
        best_cfg = apply_overrides(cfg, best_trial.overrides)
        log.info("best trial %s: validation %s %.4f (%s)", best["trial"], metric, best[objective_column],
                 ", ".join(f"{k}={fmt_value(v)}" for k, v in best_trial.overrides.items()))

        t = time.perf_counter()
        log.info("running the best configuration through the pipeline into %s/best", out.uri)
        best_run = run_job(best_cfg, run_id="best", output_uri=out.attempt_uri(), overwrite=True, use_ray=True,
                               address=address, public_uri=rfs.uri_join(out.uri, "best"))
        timings["best_run_s"] = time.perf_counter() - t

        test_cols = [k for k in best if k.startswith("test_")]
        metrics = {
            "kind": "sweep", "metric": metric, "objective": kind, "mode": mode,
            "objective_column": objective_column, "experiment": exp,
            "space": {d.key: d.spec() for d in dims}, "num_samples": cfg.tune.num_samples,
            "scheduler": cfg.tune.scheduler, "trials": len(rows),
            "data": {"format": cfg.data.format, "users": dataset.n_users, "items": dataset.n_items,
                     "train": len(split.train), "valid": len(split.valid), "test": len(split.test),
                     "shared_split": shared is not None, "warnings": list(dataset.warnings) + list(warnings)},
            "best": {"trial": best["trial"], "overrides": best_trial.overrides,
                     "valid": {metric: best[objective_column]},
                     "test": {k[len("test_"):]: best[k] for k in test_cols}},
            "best_run": {"uri": best_run.uri, "test": best_run.metrics["test"]},
            "summary": summarise(rows, dims, objective_column, mode),
            "table": [{k: v for k, v in r.items()} for r in rows],
        }

        t = time.perf_counter()
        log.info("writing outputs to %s", out.uri)
        out.write_table("trials", table_from_rows(rows, dims), use_ray=True)
        out.write_text("best_config.yaml", best_config_yaml(best_cfg))
        out.write_json("metrics.json", metrics)
        if cfg.output.report:
            from .report_builder import build_sweep_report
            out.write_text("report.html", build_sweep_report(cfg, run_id, metrics, rows, dims))
        timings["write_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t_all
        manifest = out.complete(kind="sweep", config=cfg.to_dict(), timings=timings,
                                tune_storage=posixpath.join(storage, exp))
    return SweepResult(uri=out.uri, run_id=run_id, metrics=metrics, manifest=manifest, rows=rows,
                       best_config=best_cfg)


def headline(result: SweepResult) -> str:
    """Terminal lines: where the outputs are, the best trial, the top trials."""
    m = result.metrics
    col = m["objective_column"]
    sign = 1 if m["mode"] == "max" else -1
    done = sorted([r for r in result.rows if r["status"] == "complete"], key=lambda r: -sign * r[col])
    keys = list(m["space"])
    lines = [f"sweep {result.run_id} complete: {result.uri}",
             f"{len(result.rows)} trials ({', '.join(f'{k} {v}' for k, v in m['summary']['status'].items())}); "
             f"objective: validation {m['metric']} of the {m['objective']} model ({m['mode']})",
             f"best: {m['best']['trial']}  validation {m['metric']} {m['best']['valid'][m['metric']]:.4f}"
             + "".join(f"  test {k} {v:.4f}" for k, v in list(m["best"]["test"].items())[:2]),
             "top trials:"]
    for r in done[:5]:
        lines.append("  " + "  ".join(f"{k}={fmt_value(r[k])}" for k in keys) + f"  {col}={r[col]:.4f}")
    lines.append(f"best configuration run: {m['best_run']['uri']}")
    return "\n".join(lines)

