"""The run's self-contained HTML report: metrics table, value distributions, ROC, training curve."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .report import Report, roc_curve, value_distributions


def _fmt_setting(cfg) -> dict:
    return {"data": f"{cfg.data.format} {cfg.data.path or ''}".strip(), "split": cfg.split.kind,
            "noise ratio": cfg.noise.ratio, "model": cfg.model.kind, "valuation": cfg.valuation.method,
            "prune": f"{cfg.prune.strategy} {cfg.prune.fraction if cfg.prune.strategy == 'fraction' else ''} "
                     f"({cfg.prune.scope})"}


def build_report(cfg, run_id: str, metrics: dict, values: pa.Table, base, valuation, explanation=None) -> str:
    rep = Report(f"recval run {run_id}", f"{cfg.valuation.method} values of {cfg.model.kind} training data")
    from .checks import report_section as checks_section
    from .decision import report_section as verdict_section
    verdict_section(rep, metrics.get("verdict"))
    checks_section(rep, metrics.get("checks"))
    rep.key_values(_fmt_setting(cfg) | {k: v for k, v in metrics["data"].items() if k != "warnings"})
    for w in metrics["data"].get("warnings", []):
        rep.paragraph(f"Warning: {w}")

    why_section_of_recommendations(rep, metrics.get("why_examples"))
    rep.heading("Test metrics: base vs pruned vs random-pruned")
    test = metrics["test"]
    keys = list(test["base"])
    rows = [{"model": tag, **test[tag]} for tag in ("base", "pruned", "random_pruned") if tag in test]
    rep.table(rows, ["model"] + keys, highlight_best={k: "max" for k in keys})
    ev = metrics.get("evaluation")
    if ev and ev["sampled_users"] < ev["eligible_users"]:      # evaluate.sample_users
        va = ev.get("valid", {})
        rep.paragraph(f"Ranking metrics are on a seeded sample of {ev['sampled_users']} of {ev['eligible_users']} "
                      f"test users (evaluate.sample_users, sample_seed {ev['seed']}), the same users for every "
                      f"model" + (f"; validation (early stopping) used {va['sampled_users']} of "
                                  f"{va['eligible_users']} users" if va else "") + ".")
    exp = metrics.get("exposure")
    if exp:
        cols = list(next(iter(exp.values())))
        rep.table([{"model": tag, **vals} for tag, vals in exp.items()], ["model"] + cols,
                  caption="beyond accuracy on test: share of the catalogue recommended (coverage), mean "
                          "training popularity of the recommended items, Gini of the items' exposure")
    rel = metrics.get("relative", {})
    if rel:
        rep.table([{"comparison": tag.replace("_vs_", " vs "), **{k: 100 * v for k, v in r.items()}}
                   for tag, r in rel.items()], ["comparison"] + keys,
                  caption="relative difference to the base model (%)", number_format="{:+.2f}")

    dropped_section(rep, metrics.get("dropped_profile"))
    rep.heading("Value distribution")
    if "split" in values.column_names:     # the whole log valued (valuation.coverage: all)
        cov = metrics.get("coverage", {})
        part = np.asarray(values.column("split").to_pylist(), dtype=object)
        v = values.column("value").to_numpy(zero_copy_only=False)
        rep.paragraph(f"Every row of the log is valued by K-fold cross-fitting ({cov.get('folds')} folds): "
                      f"{cov.get('how', '')}. The plots below the first one show the training rows.")
        rep.histogram({p: v[part == p] for p in ("train", "valid", "test") if (part == p).any()},
                      title="cross-fitted values by split", xlabel="value (higher = more useful)")
        values = values.filter(pa.array(part == "train"))
    v = values.column("value").to_numpy(zero_copy_only=False)
    noise = values.column("is_noise").to_numpy(zero_copy_only=False).astype(bool) \
        if "is_noise" in values.column_names else None
    if noise is not None and noise.any():            # only when noise was injected
        rep.histogram({"clean": v[~noise], "noise": v[noise]}, title="values by is_noise",
                      xlabel="value (higher = more useful)")
        nd = metrics.get("noise_detection", {})
        if nd.get("n_noise"):
            ok = ~np.isnan(v)
            fpr, tpr, auc = roc_curve(-v[ok], noise[ok])
            rep.line_plot({f"{cfg.valuation.method} (AUC {auc:.3f})": (fpr, tpr),
                           "chance": (np.array([0.0, 1.0]), np.array([0.0, 1.0]))},
                          title="noise detection ROC (score = -value)", xlabel="false positive rate",
                          ylabel="true positive rate", markers=False)
            rep.table([nd], list(nd), caption="noise detection")
    else:
        rep.histogram({"all": v}, title="values", xlabel="value (higher = more useful)")

    for section in method_sections(valuation.method):
        section(rep, valuation, metrics, values)
    if explanation is not None:
        why_section(rep, explanation, cfg.valuation.method)

    hist = [h for h in base.history if any(k.startswith("valid_") for k in h)]
    if base.history:
        ep = np.array([h["epoch"] for h in base.history], dtype=float)
        rep.heading("Base model training")
        rep.line_plot({"train loss": (ep, np.array([h["train_loss"] for h in base.history]))},
                      title="training loss", xlabel="epoch", ylabel="loss")
        if hist:
            key = next(k for k in hist[0] if k.startswith("valid_"))
            rep.line_plot({key: (np.array([h["epoch"] for h in hist], float), np.array([h[key] for h in hist]))},
                          title=f"validation {key[6:]} (selected epoch {base.best_epoch})", xlabel="epoch",
                          ylabel=key[6:])
    rep.heading("Training runs")
    rep.table([{"model": k, **s} for k, s in metrics["training"].items()])
    if metrics.get("profile"):
        profile_section(rep, metrics["profile"])
    return rep.html()


def method_sections(method: str) -> list:
    """The report sections a valuation method registered (``report_sections``: callables or
    ``"module:function"`` paths, each ``section(rep, valuation, metrics, values)``): the
    report names no method, every valuer brings its own."""
    import importlib

    from .registry import VALUERS
    out = []
    for s in VALUERS.meta(method).get("report_sections", ()):
        if isinstance(s, str):
            mod, _, fn = s.partition(":")
            s = getattr(importlib.import_module(mod), fn)
        out.append(s)
    return out


def profile_section(rep, profile: dict) -> None:
    """Per stage: wall seconds, rows/s and the driver's peak memory (``metrics.profile``)."""
    rep.heading("Where the time and memory went")
    stages = profile["stages"]
    rep.table([{"stage": s["stage"], "seconds": s["seconds"], "rows": s["rows"], "rows/s": s["rows_per_s"],
                "peak RSS MB": s["peak_rss_mb"], "peak private MB": s.get("peak_private_mb"),
                "private bytes/row": s.get("private_bytes_per_row")} for s in stages])
    rep.bar_chart([s["stage"] for s in stages], [s["seconds"] for s in stages], title="wall seconds per stage",
                  xlabel="seconds")
    rep.paragraph(profile.get("note", ""))


def why_section(rep, explanation, method: str = "") -> None:
    """Why these values: the surrogate's fit (held-out R^2, predicted vs true value), the global
    importance (mean |Shapley value| per feature) and dependence plots (attribution against the
    feature) of the top features; see :mod:`recval_ray.core.explain_values`."""
    info = explanation.info
    rep.heading("Why these values")
    r2 = info.get("r2_heldout", float("nan"))
    trust = ("the surrogate reproduces the values well" if r2 >= 0.7 else
             "the surrogate reproduces the values only partly: read the attributions as trends" if r2 >= 0.3 else
             "the surrogate explains little of the values: these features do not account for them")
    rep.paragraph(f"A {info.get('surrogate')} surrogate is fitted to the {method} values from interpretable "
                  f"interaction features and explained with interventional Shapley values ({info.get('backend')}, "
                  f"{info.get('background')} background rows): each interaction's attributions sum to the "
                  f"surrogate's prediction minus the base value {explanation.base_value:.4g}. Held-out R^2 "
                  f"{r2:.3f}: {trust}.")
    rep.key_values({"features": ", ".join(explanation.features),
                    "dropped features": "; ".join(f"{k} ({v})" for k, v in explanation.dropped.items()) or "none",
                    "imputed (rows without the field)": ", ".join(f"{k}: {v}" for k, v in info.get("imputed", {}).items())
                    or "none",
                    "surrogate R^2 held-out / fit": f"{r2:.4f} / {info.get('r2_fit', float('nan')):.4f} "
                                                   f"({info.get('rows_heldout')} / {info.get('rows_fit')} rows)",
                    "rows explained": info.get("rows_explained"),
                    "max |sum phi - (f(x) - base)|": info.get("efficiency_max_error")})
    imp = explanation.importance()
    rep.bar_chart([r["feature"] for r in imp], [r["mean_abs_phi"] for r in imp],
                  title="global importance: mean |Shapley value| per feature", xlabel="mean |phi| (value units)")
    rep.table(imp, ["feature", "mean_abs_phi", "share", "mean_phi", "corr_x_phi"], number_format="{:.4g}",
              caption="corr_x_phi: Pearson correlation of the feature with its attribution (the sign of its effect)")
    if len(explanation.holdout_true):
        rep.scatter(explanation.holdout_true, explanation.holdout_pred, title="surrogate fit on held-out interactions",
                    xlabel="value", ylabel="surrogate prediction", max_points=3000)
    groups = (np.where(explanation.is_noise, "injected noise", "clean")
              if explanation.is_noise is not None and explanation.is_noise.any() else None)
    for name in explanation.top_features(int(info.get("top_features", 3))):
        j = explanation.features.index(name)
        rep.scatter(explanation.X[:, j], explanation.phi[:, j], title=f"dependence: {name}", xlabel=name,
                    ylabel=f"Shapley value of {name}", groups=groups, max_points=int(info.get("dependence_points", 2000)))


def build_compare_report(cfg, run_id: str, metrics: dict, values: dict) -> str:
    """``recval compare``: test metrics per variant (mean +- std over seeds), relative
    differences to the full model, one bar chart per metric, noise detection per method, and
    the first seed's value distributions and ROC curves. A ``compare.grid``: see
    :mod:`recval_ray.report_grid` (``values``: cell id -> label -> table)."""
    if "cells" in metrics:
        from .report_grid import build_compare_grid_report
        return build_compare_grid_report(cfg, run_id, metrics, values, _fmt_setting(cfg))
    seeds = metrics["seeds"]
    rep = Report(f"recval comparison {run_id}",
                 f"{cfg.model.kind}: full vs pruned vs random vs oracle over {len(seeds)} seed(s)")
    from .decision import report_section as verdict_section
    verdict_section(rep, metrics.get("verdict"))
    rep.key_values(_fmt_setting(cfg) | {
        "seeds": ", ".join(map(str, seeds)), "seeds vary": ", ".join(metrics["vary"]),
        "methods": ", ".join(metrics["methods"]), "variants": ", ".join(metrics["variants"])}
        | {k: v for k, v in metrics["data"].items() if k != "warnings"})
    for w in metrics["data"].get("warnings", []):
        rep.paragraph(f"Warning: {w}")
    rep.paragraph("full: the base model on all (noisy) training data; pruned:M: retrained without "
                  "what method M prunes; random:M: retrained without as many random interactions; "
                  "oracle: retrained without the noise (is_noise). Every model selected on validation, "
                  "evaluated on test; mean +- sample standard deviation over seeds.")

    summary = metrics["summary"]
    keys = list(next(iter(summary.values()), {}))
    rep.heading("Test metrics (mean \u00b1 std over seeds)")

    def cell(st):
        return f"{st['mean']:.4f}" + ("" if st["std"] != st["std"] else f" \u00b1 {st['std']:.4f}")

    rep.table([{"variant": label, **{k: cell(st[k]) for k in keys if k in st}}
               for label, st in summary.items()], ["variant"] + keys)
    rel = metrics.get("relative_to_full", {})
    if rel:
        rep.table([{"variant": label, **{k: f"{100 * st[k]['mean']:+.2f}%"
                                            + ("" if st[k]["std"] != st[k]["std"] else f" \u00b1 {100 * st[k]['std']:.2f}")
                                            for k in keys if k in st}}
                   for label, st in rel.items()], ["variant"] + keys,
                  caption="relative difference to the full model, paired by seed (%)")
    labels = list(summary)
    for k in keys:
        rep.bar_chart(labels, [summary[lab][k]["mean"] if k in summary[lab] else float("nan") for lab in labels],
                      errors=[summary[lab][k]["std"] if k in summary[lab] else 0.0 for lab in labels],
                      title=f"test {k} (mean \u00b1 std over {len(seeds)} seeds)", xlabel=k)

    nd = metrics.get("noise_detection", {})
    if nd:
        rep.heading("Noise detection")
        rep.table([{"method": m, "AUC of -value": cell(st["auc"]),
                    f"precision@{metrics['data']['injected_noise']}": cell(st["precision_at_n"])}
                   for m, st in nd.items()],
                  caption="per method, mean \u00b1 std over seeds (precision among the n_noise lowest values)")
    ch, stab = metrics.get("checks", {}), metrics.get("seed_stability") or {}
    if ch or stab:
        rep.heading("Do the values carry counterfactual signal?")
        rows = []
        for m in dict.fromkeys(list(ch) + list(stab)):
            st = ch.get(m, {})
            rows.append({"method": m, "LDS": cell(st["lds"]) if "lds" in st else "",
                         "LDS SE (bootstrap, mean)": f"{st['lds_se']['mean']:.3f}" if "lds_se" in st else "",
                         "per-user LDS": cell(st["lds_per_user"]) if "lds_per_user" in st else "",
                         "LDS on the validation loss": cell(st["lds_loss"]) if "lds_loss" in st else "",
                         "LOO correlation": cell(st["loo"]) if "loo" in st else "",
                         "LOO correlation (loss)": cell(st["loo_loss"]) if "loo_loss" in st else "",
                         "seed stability": f"{stab[m]['mean']:.3f}" if m in stab else ""})
        rep.table(rows, caption="LDS: Spearman over random half subsets between the sum of the kept rows' values "
                                "and the validation metric of a model trained on them (mean \u00b1 std over seeds; ~0: "
                                "no signal); LOO: Spearman between sampled rows' values and the effect of "
                                "retraining without each; seed stability: Spearman between the values of two training seeds "
                                "(mean over pairs)")
    if values:
        rep.heading(f"Value distributions (seed {seeds[0]})")
        value_distributions(rep, values)
    rep.heading("Training runs")
    cols = ["seed", "variant", "method", "n_train", "dropped", "noise_dropped", "best_epoch", "epochs_run",
            "best_valid", "seconds"]
    rep.table(metrics.get("runs", []), cols)
    return rep.html()


def build_sweep_report(cfg, run_id: str, metrics: dict, rows: list, dims: list) -> str:
    """``recval sweep``: the best trial, the trials sorted by the validation objective, the
    objective against each swept key, and a heat map of the best objective when exactly two
    keys are swept. Test metrics are shown, never used to choose."""
    from .report import fmt_value

    col, metric, mode = metrics["objective_column"], metrics["metric"], metrics["mode"]
    sign = 1.0 if mode == "max" else -1.0
    pick = max if mode == "max" else min
    keys = [d.key for d in dims]
    rep = Report(f"recval sweep {run_id}",
                 f"{cfg.model.kind}: {len(rows)} trials over {', '.join(keys)}; objective: validation "
                 f"{metric} of the {metrics['objective']} model ({mode})")
    rep.key_values(_fmt_setting(cfg) | {
        "space": "; ".join(f"{k}: {kind} {vals}" for k, spec in metrics["space"].items()
                           for kind, vals in spec.items()),
        "objective": f"{metrics['objective']} model, validation {metric} ({mode})",
        "scheduler": metrics["scheduler"], "samples": metrics["num_samples"],
        "trials": ", ".join(f"{n} {s}" for s, n in metrics["summary"]["status"].items())}
        | {k: v for k, v in metrics["data"].items() if k != "warnings"})
    for w in metrics["data"].get("warnings", []):
        rep.paragraph(f"Warning: {w}")
    best = metrics["best"]
    rep.heading("Best trial (chosen on validation)")
    rep.key_values({"trial": best["trial"],
                    **{k: fmt_value(v) for k, v in best["overrides"].items()},
                    f"validation {metric}": best["valid"][metric],
                    **{f"test {k}": v for k, v in best["test"].items()}})
    best_test = metrics.get("best_run", {}).get("test", {})
    if best_test:
        names = list(next(iter(best_test.values())))
        rep.table([{"model": tag, **m} for tag, m in best_test.items()], ["model"] + names,
                  caption="the best configuration run through the pipeline (best/): test metrics")

    rep.heading("Trials (sorted by the validation objective)")
    done = [r for r in rows if r["status"] == "complete" and np.isfinite(r[col])]
    other = [r for r in rows if r not in done]
    ordered = sorted(done, key=lambda r: -sign * r[col]) + other
    test_cols = [k for k in (rows[0] if rows else {}) if k.startswith("test_")]
    cols = ["trial"] + keys + [col] + test_cols + ["status", "seconds"]
    rep.table([{c: (fmt_value(r[c]) if c in keys else r.get(c)) for c in cols} for r in ordered], cols,
              highlight_best={col: mode}, caption="test metrics are reported, never used to choose")

    rep.heading(f"Validation {metric} against each swept key")
    for d in dims:
        vals = [r[d.key] for r in done]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
        if not done:
            break
        if numeric:
            x = np.array(vals, dtype=float)
            y = np.array([r[col] for r in done], dtype=float)
            logx = bool(d.kind == "loguniform" or (x.min() > 0 and x.max() / x.min() >= 20))
            if d.kind in ("grid", "choice"):
                xs = np.array(sorted(set(x.tolist())))
                series = {"best over the other keys": (xs, np.array([pick(y[x == v]) for v in xs]))}
                if len(dims) == 2:
                    other_key = next(o for o in dims if o.key != d.key)
                    for ov in other_key.values:
                        sel = np.array([r[other_key.key] == ov for r in done])
                        if sel.any():
                            order = np.argsort(x[sel])
                            series[f"{other_key.key}={fmt_value(ov)}"] = (x[sel][order], y[sel][order])
                rep.line_plot(series, title=f"validation {metric} vs {d.key}", xlabel=d.key,
                              ylabel=f"validation {metric}", logx=logx)
            else:
                rep.scatter(x, y, title=f"validation {metric} vs {d.key}", xlabel=d.key,
                            ylabel=f"validation {metric}", logx=logx)
        else:
            labels = sorted({fmt_value(v) for v in vals})
            rep.bar_chart(labels, [pick([r[col] for r in done if fmt_value(r[d.key]) == lab]) for lab in labels],
                          title=f"best validation {metric} per {d.key}", xlabel=d.key)
    if len(dims) == 2 and done:
        a, b = dims
        av = sorted({fmt_value(r[a.key]): r[a.key] for r in done}.items(), key=lambda kv: _sort_key(kv[1]))
        bv = sorted({fmt_value(r[b.key]): r[b.key] for r in done}.items(), key=lambda kv: _sort_key(kv[1]))
        if len(av) <= 30 and len(bv) <= 30:
            m = np.full((len(av), len(bv)), np.nan)
            for i, (sa, _) in enumerate(av):
                for j, (sb, _) in enumerate(bv):
                    cell = [r[col] for r in done if fmt_value(r[a.key]) == sa and fmt_value(r[b.key]) == sb]
                    if cell:
                        m[i, j] = pick(cell)
            rep.heatmap(m, [s for s, _ in av], [s for s, _ in bv],
                        title=f"validation {metric} ({'best' if mode == 'max' else 'lowest'} per cell)",
                        xlabel=b.key, ylabel=a.key, value_format="{:.4f}")
    return rep.html()


def _sort_key(v):
    return (0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, str(v))


def dropped_section(rep, profile) -> None:
    """What the pruning dropped: the dropped share per rating, user-activity decile,
    item-popularity decile and time decile (bars), and the users / items losing most rows."""
    if not profile:
        return
    rep.heading("What was dropped")
    overall = sum(r["dropped"] for r in profile if r["facet"] == "user_activity") / max(
        1, sum(r["rows"] for r in profile if r["facet"] == "user_activity"))
    rep.paragraph(f"Share of each group's training rows that the pruning dropped (overall {overall:.1%}).")
    titles = {"rating": "by rating", "user_activity": "by user activity decile (training rows per user)",
              "item_popularity": "by item popularity decile (training rows per item)",
              "time": "by time decile"}
    for facet, title in titles.items():
        rows = [r for r in profile if r["facet"] == facet]
        if rows:
            rep.bar_chart([r["group"] for r in rows], [100 * r["dropped_share"] for r in rows],
                          title=f"dropped share {title}", xlabel="dropped (% of the group's rows)")
    for facet, name in (("top_user", "users"), ("top_item", "items")):
        rows = [r for r in profile if r["facet"] == facet]
        if rows:
            rep.table([{name[:-1]: r["group"], "training rows": r["rows"], "dropped": r["dropped"],
                        "share": r["dropped_share"]} for r in rows],
                      [name[:-1], "training rows", "dropped", "share"],
                      caption=f"the {name} losing the most rows")


def why_section_of_recommendations(rep, examples) -> None:
    """A few users' top recommendation and the training rows that hold it up most (TracIn at the
    final weights; ``recval why RUN --user U --item X`` for any pair, over every checkpoint)."""
    if not examples:
        return
    rep.heading("Why these recommendations")
    rep.paragraph("For three seeded users: the top-1 item (training items excluded) and its strongest proponents "
                  "among the training rows, by TracIn at the final weights (a row's contribution: how much a "
                  "gradient step on it raises the score). `recval why RUN --user U --item X --verify` attributes "
                  "any pair over the run's checkpoints and checks the answer by retraining.")
    for e in examples:
        rep.paragraph(f"User {e['user_id']} -> item {e['item_id']} (score {e['score']:.3f}; "
                      f"{e['share_user_rows']:.0%} of the positive contribution from the user's own rows)")
        rep.table(e["proponents"], ["user_id", "item_id", "contribution"])
