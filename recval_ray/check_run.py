"""``recval check RUN``: counterfactual checks (LDS) of an earlier run's values.

The run's config comes from its ``manifest.json``; its data and split are rebuilt from that
config (ingestion, split and noise are deterministic) and its ``values/`` are placed on the
training rows by original ids (rows of other splits, from ``valuation.coverage: all``, are
not part of the check). Settings: the run's ``valuation.checks`` section and ``--set``
overrides (``valuation.checks.lds.subsets`` defaults to 50 when the run had the check off).
The run is never modified: the check is a new output (default ``<run>-check`` next to it) with
``metrics.json``, ``report.html`` and ``manifest.json`` written last.
"""
from __future__ import annotations

import logging
import posixpath
import time
from typing import Optional

log = logging.getLogger("recval_ray")

DEFAULT_SUBSETS = 50


def _base_epochs(fs, root: str) -> Optional[int]:
    """The run's base model's selected epoch count (``metrics.json`` ``training.base``), which
    the check's models train for; None when the run does not record it."""
    import json
    try:
        with fs.open_input_stream(posixpath.join(root, "metrics.json")) as f:
            base = json.loads(f.read().decode())["training"]["base"]
        return int(base["best_epoch"]) + 1 if base.get("best_epoch", -1) >= 0 else None
    except (OSError, KeyError, TypeError, ValueError):
        return None


def check_run(run_uri: str, overrides: Optional[list[str]] = None, *, output_uri: Optional[str] = None,
              run_id: Optional[str] = None, overwrite: bool = False, use_ray: bool = True) -> dict:
    """Check the values of the run at ``run_uri``; returns the new output's manifest."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from .checks import checks_executor, report_section, run_checks
    from .core.explain_values import align_values
    from .core.valuers.base import Valuation
    from .explain_run import open_beside, read_run
    from .pipeline import load_data, make_split
    from .report import Report

    t0 = time.perf_counter()

    def default_subsets(raw: dict) -> None:
        lds_raw = raw.setdefault("valuation", {}).setdefault("checks", {}).setdefault("lds", {})
        if not lds_raw.get("subsets"):
            lds_raw["subsets"] = DEFAULT_SUBSETS
    cfg, manifest, fs, root = read_run(run_uri, list(overrides or []), "check", prepare=default_subsets)
    source_id, out = open_beside(run_uri, manifest, root, "check", cfg, output_uri, run_id, overwrite)
    with out:
        dataset = load_data(cfg, use_ray=False)
        split, _ = make_split(cfg, dataset)
        values = pq.read_table(posixpath.join(root, "values"), filesystem=fs)
        if "split" in values.column_names:
            values = values.filter(pc.equal(values["split"], "train"))
        row_values = align_values(values, split.train, dataset)
        valuation = Valuation(method=cfg.valuation.method, values=row_values)
        base_epochs = _base_epochs(fs, root)
        checks = run_checks(cfg, split, [(cfg.valuation.method, valuation)], checks_executor(cfg, use_ray),
                            base_epochs=base_epochs)
        metrics = {"source_run": run_uri, "valuation": cfg.valuation.method, "checks": checks}
        out.write_json("metrics.json", metrics)
        rep = Report(f"recval check {source_id}", f"counterfactual checks of the {cfg.valuation.method} values "
                                                  f"of {run_uri}")
        report_section(rep, checks)
        out.write_text("report.html", rep.html())
        result = out.complete(kind="check", config=cfg.to_dict(), source_run=run_uri,
                              timings={"total_s": time.perf_counter() - t0})
    m = checks["lds"]["methods"][cfg.valuation.method]["metric"]
    result["headline"] = (f"{cfg.valuation.method}: LDS {m['lds']:.3f} +- {m['se']:.3f} over "
                          f"{checks['lds']['subsets']} subsets (per user {m['per_user']['mean']:.3f} +- "
                          f"{m['per_user']['se']:.3f})")
    return result
