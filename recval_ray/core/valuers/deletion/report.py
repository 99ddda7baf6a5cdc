"""The report section of Deletion diagnostics (registered as ``report_sections``): it receives the report
(any object with the report's methods: ``heading``, ``table``, ``scatter``...), so the method
needs nothing from the report module."""
from __future__ import annotations

import numpy as np

from ...removal import report_section as removal_section


def section(rep, valuation, metrics: dict, values) -> None:
    """Entity-level values (users, items, groups): the deletion diagnostics."""
    if valuation.entities is not None:
        entity_section(rep, valuation, metrics)


def entity_section(rep, valuation, metrics: dict) -> None:
    """Entity-level values (deletion diagnostics): influence vs number of ratings (the
    paper's Fig. 3), the influence histogram, the 5 most and least influential entities
    (Tables 4, 7, 13) and the removal experiment (Tables 5, 6, 8, 9)."""
    ent = valuation.entities
    kind = valuation.entity_kind or "entity"
    info = valuation.info
    id_col = info.get("id_column", f"{kind}_id")
    metric = info.get("metric", "value")
    value = np.asarray(ent["value"], dtype=float)
    ids = np.asarray(ent[id_col].to_pylist() if hasattr(ent[id_col], "to_pylist")
                     else ent[id_col])
    rep.heading(f"Influence of {kind}s ({metric}, {info.get('influence_split', '')})")
    rep.paragraph(f"influence = {metric}(full model) - {metric}(model retrained without the {kind}), "
                  f"mean over {len(info.get('seeds', []))} seed(s), engine {info.get('engine')}, "
                  f"{info.get('entities_valued')} {kind}s valued"
                  + (f"; Spearman of the values between disjoint seed halves "
                     f"{info['stability_spearman_halves']:.3f}" if "stability_spearman_halves" in info else ""))
    rep.scatter(np.asarray(ent["n_ratings"], float), value, title="influence vs number of ratings",
                xlabel=f"training interactions of the {kind}", ylabel=f"influence on {metric}", logx=True)
    rep.histogram({f"{kind}s": value}, title=f"influence on {metric}", xlabel="influence (metric with - without the entity)")
    cols = [id_col, "value", "value_se", "n_ratings"] + \
        [c for c in ("mean_rating", "std_rating") if c in ent]
    order = np.argsort(-np.where(np.isnan(value), -np.inf, value), kind="stable")
    for title, idx in (("most influential", order[:5]),
                       ("least influential", order[::-1][:5][np.isfinite(value[order[::-1][:5]])])):
        rows = [{c: (ids[i] if c == id_col else np.asarray(ent[c])[i]) for c in cols} for i in idx]
        rep.table(rows, cols, caption=f"the 5 {title} {kind}s")
    summary = valuation.tables.get("removal_summary")
    if summary:
        groups = info.get("removal", {})
        n = len(next(iter(groups.values()), []))
        removal_section(rep, summary, f"Removal experiment: retrained without {n} {kind}s (test split)",
                        note=f"rows of every removed {kind} excluded for every variant")
