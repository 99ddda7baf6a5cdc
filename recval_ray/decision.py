"""The verdict stage: retrain the candidate prunings, decide on validation, report on test.

For each ``verdict.fractions`` x ``verdict.scopes`` the run's values select the rows to drop
(:func:`~.core.prune.prune_valued`), a model is retrained without them (the job's training, its
own early stopping on validation) and scored on validation per user; every model is ranked
against the same candidates (the full training set and, for test, validation excluded), so
only the training data differ. The statistics and the decision rule are in
:mod:`.core.verdict`; the returned record is ``metrics["verdict"]``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Callable, Optional

import numpy as np

from .core.data import Split
from .core.executor import LocalExecutor
from .core.evaluation import per_user_metric
from .core.prune import prune_valued, random_prune_mask
from .core.train import RATING_METRICS, TrainResult, training_rows
from .core.valuers.base import Valuation
from .core.verdict import (Candidate, best_candidate, bootstrap_relative_change, decide, paired_t_test,
                           relative_change, sentence)
from .schema import JobConfig

log = logging.getLogger("recval_ray")


def unavailable(cfg: JobConfig, split: Split, valuation: Valuation) -> Optional[str]:
    """Why no verdict can be computed for this run, or None."""
    if len(split.valid) == 0:
        return "no validation split: the decision is taken on validation"
    if cfg.train.select_metric in RATING_METRICS:
        return f"train.select_metric {cfg.train.select_metric} is a rating metric; the verdict ranks"
    if valuation.row_entity is not None:
        return (f"{cfg.valuation.method} values entities ({valuation.entity_kind}); their removal "
                f"experiment is the removal_summary table")
    if not np.isfinite(np.asarray(valuation.values, dtype=np.float64)).any():
        return "no training row has a finite value"
    return None


def _seeded(cfg: JobConfig, seed: int) -> JobConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=int(seed)))


def score_training(shared, item: dict) -> dict:
    """One retraining of the verdict, a work item (runs in the driver or on a Ray actor): the
    job's model trained on the training rows ``item["keep"]`` (packed bits) with ``train.seed =
    item["seed"]``, returned as its per-user ``train.select_metric`` on validation and on test
    (both rankings exclude the full training set; test also validation). No model travels back.
    ``shared``: ``(cfg, split, train)`` with ``train`` the job's training function."""
    cfg, split, train = shared
    keep = np.unpackbits(item["keep"], count=len(split.train)).astype(bool)
    full = bool(keep.all())
    kept = split.train if full else training_rows(cfg.model.kind, split.train, keep)
    model = train(_seeded(cfg, item["seed"]), kept, split.valid, tag=item["tag"], track_losses=False).model
    ev, metric = cfg.evaluate, cfg.train.select_metric
    return {"valid": per_user_metric(model, split, ev, metric, "valid", context=None if full else [kept]),
            "test": per_user_metric(model, split, ev, metric, "test", context=None if full else [kept, split.valid])}


def _run(executor, shared, items: list) -> list:
    """``score_training`` of every item, assembled by item (never by arrival order)."""
    out: list = [None] * len(items)

    def done(i, result):
        out[i] = result
        log.info("verdict: %s: validation %.4f", items[i]["tag"], float(np.mean(result["valid"])))
    (executor or LocalExecutor()).map(score_training, shared, items, done)
    return out


def verdict(cfg: JobConfig, split: Split, valuations, base: TrainResult, train: Callable,
            executor=None) -> Optional[dict]:
    """``metrics["verdict"]`` (see :mod:`.core.verdict`), ``{"decision": None, "skipped": why}``
    when it cannot be computed, None when ``verdict.enabled`` is false. ``valuations``: the
    ``(label, Valuation)`` candidates (:func:`recval_ray.pipeline.candidate_valuations`), the
    run's own first, or one Valuation. ``train(cfg, rows, valid, tag=...)``: the job's training
    (:func:`recval_ray.pipeline.train`, module-level so actors can run it). ``executor``
    (``core.executor``; None: this process) runs
    the retrainings: first every distinct candidate drop set (candidates whose drop sets
    coincide, e.g. small-loss and pld per user, since standardising within a user keeps the
    user's order, are trained once), then the test report's extra seeds and the random
    control. Results depend only on the config, never on the executor."""
    vc = cfg.verdict
    if not vc.enabled:
        return None
    if isinstance(valuations, Valuation):
        valuations = [(cfg.valuation.method, valuations)]
    why = unavailable(cfg, split, valuations[0][1])
    if why:
        log.info("verdict: not computed (%s)", why)
        return {"decision": None, "skipped": why}
    usable = [(label, v) for label, v in valuations if unavailable(cfg, split, v) is None]
    metric, ev, seed0 = cfg.train.select_metric, cfg.evaluate, int(cfg.train.seed)
    shared = (cfg, split, train)

    # 1. every candidate's drop set; each distinct one retrained once
    plans, items, index = [], [], {}     # plans: (label, fraction, scope, keep, valuation, item index)
    for label, valuation in usable:
        for scope in vc.scopes:
            for fraction in vc.fractions:
                pc = dataclasses.replace(cfg.prune, strategy="fraction", fraction=float(fraction), scope=scope)
                keep, _ = prune_valued(valuation, split, pc)
                packed = np.packbits(keep)
                key = hashlib.sha1(packed.tobytes()).hexdigest()
                if key not in index:
                    index[key] = len(items)
                    items.append({"keep": packed, "seed": seed0, "tag": f"verdict {label} {fraction:g} {scope}"})
                plans.append((label, float(fraction), scope, keep, valuation, index[key]))
    scores = _run(executor, shared, items)
    full_valid = per_user_metric(base.model, split, ev, metric, "valid")
    candidates: list[Candidate] = []
    first_of: dict = {}
    for label, fraction, scope, keep, valuation, i in plans:
        cand = Candidate(label, fraction, scope, int((~keep).sum()), float(np.mean(scores[i]["valid"])))
        if i in first_of:
            cand.same_as = first_of[i].label()
        else:
            first_of[i] = cand
        candidates.append(cand)
    chosen = best_candidate(candidates)
    _, _, _, keep, chosen_valuation, chosen_i = plans[candidates.index(chosen)]
    pruned_valid = scores[chosen_i]["valid"]
    delta_valid = relative_change(full_valid, pruned_valid)
    v_lo, v_hi = bootstrap_relative_change(full_valid, pruned_valid, vc.bootstrap, vc.confidence, vc.seed)
    decision = decide(delta_valid, v_lo)

    # 2. the report on test: the base model and the chosen pruning over the verdict's seeds, and a
    # random pruning of as many rows (per user when per-user), the job's training seed
    seeds = list(vc.seeds) or [seed0]
    pc = dataclasses.replace(cfg.prune, strategy="fraction", fraction=chosen.fraction, scope=chosen.scope)
    random_keep = random_prune_mask(keep, split.train, pc, cfg.prune.seed + 1, values=chosen_valuation.values)
    everything = np.packbits(np.ones(len(split.train), dtype=bool))
    more = [{"keep": np.packbits(random_keep), "seed": seed0,
             "tag": f"verdict random {chosen.fraction:g} {chosen.scope}"}]
    for s in seeds:
        if s != seed0:
            more += [{"keep": everything, "seed": s, "tag": f"verdict full seed {s}"},
                     {"keep": np.packbits(keep), "seed": s, "tag": f"verdict {chosen.label()} seed {s}"}]
    extra = _run(executor, shared, more)
    random_test = extra[0]["test"]
    full_test, pruned_test, j = [], [], 1
    for s in seeds:
        if s == seed0:
            full_test.append(per_user_metric(base.model, split, ev, metric, "test"))
            pruned_test.append(scores[chosen_i]["test"])
        else:
            full_test.append(extra[j]["test"])
            pruned_test.append(extra[j + 1]["test"])
            j += 2
    a, b = np.mean(full_test, axis=0), np.mean(pruned_test, axis=0)
    lo, hi = bootstrap_relative_change(a, b, vc.bootstrap, vc.confidence, vc.seed + 1)
    if len(seeds) >= 2:
        _, p = paired_t_test([x.mean() for x in full_test], [x.mean() for x in pruned_test])
        test_name = f"paired t-test over {len(seeds)} seeds (per-seed means over test users)"
    else:
        _, p = paired_t_test(a, b)
        test_name = "paired t-test over test users (one training seed)"
    out = {
        "decision": decision, "method": chosen.method, "fraction": chosen.fraction, "scope": chosen.scope,
        "dropped": chosen.dropped, "metric": metric,
        "delta_valid": delta_valid, "valid_ci_low": v_lo, "valid_ci_high": v_hi,
        "delta_test": relative_change(a, b), "ci_low": lo, "ci_high": hi, "p_value": p,
        "confidence": vc.confidence, "seeds": seeds,
        "vs_random": relative_change(full_test[seeds.index(seed0)] if seed0 in seeds else a, random_test),
        "test_full": float(a.mean()), "test_pruned": float(b.mean()), "test_random": float(random_test.mean()),
        "valid_full": float(full_valid.mean()),
        "test": test_name,
        "ci": (f"paired percentile bootstrap over {len(a)} test users, {vc.bootstrap} resamples"
               + (f", per-user metrics averaged over {len(seeds)} seeds" if len(seeds) > 1 else "")),
        "rule": ("prune when the best candidate's validation change is > 0 and the lower end of its "
                 "bootstrap CI over validation users is > 0; chosen on validation only"),
        "candidates": [dataclasses.asdict(c) for c in candidates],
        "methods": [label for label, _ in usable],
        "trained_candidates": len(items),
    }
    out["sentence"] = sentence(out)
    log.info("verdict: %s", out["sentence"])
    return out


def report_section(rep, v: Optional[dict]) -> None:
    """The verdict at the top of a run's report: the sentence, the candidates' validation
    scores against keeping everything (plot and table), and the test figures of the choice."""
    if not v:
        return
    rep.heading("Verdict")
    if not v.get("decision"):
        rep.paragraph(f"No verdict: {v['skipped']}.")
        return
    rep.paragraph(v["sentence"])
    if v.get("next_step"):
        rep.paragraph(v["next_step"][0].upper() + v["next_step"][1:] + ".")
    metric = v["metric"]
    series = {}
    for method, scope in dict.fromkeys((c["method"], c["scope"]) for c in v["candidates"]):
        pts = sorted((c["fraction"], c["valid"]) for c in v["candidates"]
                     if c["scope"] == scope and c["method"] == method)
        series[f"{method}, {scope}"] = (np.array([0.0] + [f for f, _ in pts]),
                                        np.array([v["valid_full"]] + [s for _, s in pts]))
    rep.line_plot(series, title=f"validation {metric} by fraction dropped (0 = keep everything)",
                  xlabel="fraction of training rows dropped", ylabel=f"validation {metric}")
    rep.table([{"method": c["method"], "fraction": c["fraction"], "scope": c["scope"], "dropped": c["dropped"],
                f"validation {metric}": c["valid"], "same drop set as": c.get("same_as") or ""}
               for c in v["candidates"]],
              ["method", "fraction", "scope", "dropped", f"validation {metric}", "same drop set as"],
              caption=f"candidate prunings (keeping everything: {v['valid_full']:.4f}); {v['rule']}")
    rep.table([{"model": "keep everything", f"test {metric}": v["test_full"]},
               {"model": f"chosen pruning ({v['method']} {v['fraction']:g}, {v['scope']})",
                f"test {metric}": v["test_pruned"]}]
              + ([{"model": "random pruning of as many rows", f"test {metric}": v["test_random"]}]
                 if v.get("test_random") is not None else []),
              ["model", f"test {metric}"],
              caption=f"test, seeds {v['seeds']}; CI: {v['ci']}; p: {v['test']}")
