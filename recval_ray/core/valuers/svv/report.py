"""The report section of SVV (amortised Shapley values) (registered as ``report_sections``): it receives the report
(any object with the report's methods: ``heading``, ``table``, ``scatter``...), so the method
needs nothing from the report module."""
from __future__ import annotations

import numpy as np


def section(rep, valuation, metrics: dict, values) -> None:
    """The amortised Shapley explainer: training curve, agreement with references."""
    if "explainer" in valuation.info:
        explainer_section(rep, valuation)


def explainer_section(rep, valuation) -> None:
    """Amortised Shapley values (SVV): the explainer's training curve and its agreement with
    the reference Shapley values (exact or converged permutation sampling)."""
    info = valuation.info
    ex = info["explainer"]
    rep.heading("Shapley values: the FastSHAP explainer")
    rep.key_values({"value function": info.get("variant"), "epochs run": ex.get("epochs_run"),
                    "selected epoch": ex.get("best_epoch"), "training (s)": ex.get("train_s"),
                    "inference (s)": ex.get("explain_s"), "inference on": ex.get("inference")})
    hist = ex.get("history") or []
    if hist:
        ep = np.array([h["epoch"] for h in hist], float)
        series = {k.replace("_", " "): (ep, np.array([h[k] for h in hist], float))
                  for k in ("train_loss", "valid_loss") if k in hist[0]}
        rep.line_plot(series, title="explainer loss (Shapley-kernel weighted least squares)", xlabel="epoch",
                      ylabel="loss")
    ref, tab = info.get("reference"), valuation.tables.get("shapley_reference")
    if ref:
        rep.key_values({k: ref[k] for k in ("users", "exact_users", "permutation_users", "converged_users",
                                             "pearson", "spearman", "spearman_within_user", "rel_l2_error",
                                             "total_rel_error", "seconds") if k in ref})
    if tab is not None and len(tab["reference_value"]):
        noise = np.asarray(tab["is_noise"], bool)
        rep.scatter(np.asarray(tab["reference_value"], float), np.asarray(tab["explainer_value"], float),
                    title=f"explainer vs reference Shapley values ({ref.get('users')} users)",
                    xlabel="reference value (exact or permutation sampling)", ylabel="explainer value",
                    groups=np.where(noise, "injected noise", "clean") if noise.any() else None)
