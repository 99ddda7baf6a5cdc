"""``recval explain RUN``: Shapley explanations of an earlier run's values.

A complete run holds its config (``manifest.json``) and its valued data (``values/``); the
run's data and split are rebuilt from that config (ingestion, split and noise are
deterministic), the ``value`` column is aligned with the training rows by original ids
(:func:`recval_ray.core.explain_values.explain_values`) and explained with the ``explain``
settings of the run's config, ``explain.enabled`` forced on, and any ``--set`` overrides
(e.g. ``explain.surrogate=gbdt``, or ``data.path=...`` when the data moved). The run itself is
never modified: the explanation is a new output (default ``<run>-explain`` next to it) with
``explanations/``, ``metrics.json``, ``report.html`` and ``manifest.json`` written last.
"""
from __future__ import annotations

import logging
import posixpath
import time
from typing import Optional

from . import fs as rfs
from .errors import ConfigError

log = logging.getLogger("recval_ray")


def read_run(run_uri: str, overrides: list[str], verb: str, prepare=None):
    """``(config, manifest, fs, root)`` of the complete run at ``run_uri`` (a run with values/:
    what ``recval explain`` and ``recval check`` read), ``prepare(raw)`` then ``overrides``
    applied to its recorded config; raises ConfigError for a missing or incomplete run."""
    from .config import apply_override, validate_config
    from .output import read_manifest
    fs, root = rfs.resolve(run_uri)
    manifest_path = posixpath.join(root, "manifest.json")
    manifest = read_manifest(fs, manifest_path)
    if manifest is None:
        raise ConfigError(f"{run_uri}: not a complete run (no complete manifest.json); {verb} a finished "
                          f"`recval run`")
    raw = manifest.get("config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{manifest_path}: no config recorded")
    if not rfs.exists(fs, posixpath.join(root, "values")):
        raise ConfigError(f"{run_uri}: has no values/ (a `recval compare` or `recval sweep` output? {verb} "
                          f"one of its runs, e.g. {run_uri}/best)")
    if prepare is not None:
        prepare(raw)
    for o in overrides:
        apply_override(raw, o)
    return validate_config(raw), manifest, fs, root


def open_beside(run_uri: str, manifest: dict, root: str, suffix: str, cfg, output_uri: Optional[str],
                run_id: Optional[str], overwrite: bool):
    """A new output for a command about a run: ``OUTPUT/RUN_ID``, by default next to the run
    with the id ``<run id>-<suffix>``."""
    from .output import RunOutput
    source_id = manifest.get("run_id") or posixpath.basename(root.rstrip("/"))
    parent = run_uri.rstrip("/").rsplit("/", 1)[0] if "/" in run_uri.rstrip("/") else "."
    return source_id, RunOutput(output_uri or parent, run_id or f"{source_id}-{suffix}", cfg.storage).open(overwrite)


def read_run_config(run_uri: str, overrides: list[str]):
    """The config of the complete run at ``run_uri`` with ``overrides`` applied and
    ``explain.enabled`` on; raises ConfigError for a missing or incomplete run."""
    return read_run(run_uri, overrides, "explain",
                    prepare=lambda raw: raw.setdefault("explain", {}).__setitem__("enabled", True))


def explain_run(run_uri: str, overrides: Optional[list[str]] = None, *, output_uri: Optional[str] = None,
                run_id: Optional[str] = None, overwrite: bool = False) -> dict:
    """Explain the values of the run at ``run_uri``; returns the new output's manifest."""
    import pyarrow.parquet as pq

    from .core.explain_values import explain_values
    from .pipeline import load_data, make_split
    from .report import Report
    from .report_builder import why_section

    t0 = time.perf_counter()
    cfg, manifest, fs, root = read_run_config(run_uri, list(overrides or []))
    source_id, out = open_beside(run_uri, manifest, root, "explain", cfg, output_uri, run_id, overwrite)
    with out:
        dataset = load_data(cfg, use_ray=False)
        split, _ = make_split(cfg, dataset)
        values = pq.read_table(posixpath.join(root, "values"), filesystem=fs)
        log.info("explaining %d values of %s (%s surrogate, %s Shapley values)", values.num_rows, run_uri,
                 cfg.explain.surrogate, cfg.explain.backend)
        explanation = explain_values(values, split, dataset, cfg.explain)
        out.write_table("explanations/attributions", explanation.attributions_table(dataset, split.train),
                        use_ray=False)
        out.write_table("explanations/importance", explanation.importance_table(), use_ray=False)
        metrics = {"source_run": run_uri, "valuation": cfg.valuation.method, "explain": explanation.summary()}
        out.write_json("metrics.json", metrics)
        rep = Report(f"recval explain {source_id}", f"why the {cfg.valuation.method} values of {run_uri}")
        why_section(rep, explanation, cfg.valuation.method)
        out.write_text("report.html", rep.html())
        result = out.complete(kind="explain", config=cfg.to_dict(), source_run=run_uri,
                              timings={"total_s": time.perf_counter() - t0})
    log.info("explanation: surrogate held-out R^2 %.3f; top features %s", explanation.info["r2_heldout"],
             ", ".join(explanation.top_features(3)))
    return result
