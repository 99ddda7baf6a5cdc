"""The report section of TracIn (registered as ``report_sections``): it receives the report
(any object with the report's methods: ``heading``, ``table``, ``scatter``...), so the method
needs nothing from the report module."""
from __future__ import annotations

import numpy as np

from ...removal import report_section as removal_section


def section(rep, valuation, metrics: dict, values) -> None:
    """Influence over training checkpoints: queries, proponents, removal experiment."""
    tracin_section(rep, valuation, metrics)


def tracin_section(rep, valuation, metrics: dict) -> None:
    """TracIn (seed 004): settings, value and self-influence distributions, the proponents and
    opponents of the query items (the write-up's table), the opponent-removal experiment."""
    info = valuation.info
    rep.heading("TracIn: influence on the validation loss")
    kv = {"variant": info.get("variant"), "checkpoints (epochs)": ", ".join(map(str, info.get("checkpoint_epochs", []))),
          "learning rates": ", ".join(f"{x:g}" for x in info.get("checkpoint_lrs", [])),
          "selected epoch": info.get("selected_epoch"), "window": info.get("window"),
          "training examples valued": info.get("training_examples"),
          "validation examples": info.get("validation_examples"),
          "first interactions (not valued)": info.get("first_interactions_not_valued"),
          "proponents (value > 0) / opponents (< 0)": f"{info.get('positive_values')} / {info.get('negative_values')}",
          "scored on": info.get("scored_on"), "scoring (s)": info.get("scoring_seconds")}
    pc = info.get("projection_check")
    if pc:
        kv[f"random projection (d = {pc['projection_dim']}) vs exact, {pc['sample']} examples"] = (
            f"Pearson {pc['pearson_value']:.3f} / Spearman {pc['spearman_value']:.3f} (values), "
            f"Pearson {pc['pearson_queries']:.3f} (query scores), {pc['pearson_self_influence']:.3f} (self-influence)")
    rep.key_values(kv)
    rep.paragraph("value = sum over checkpoints of lr x grad loss(training example) . grad(total validation loss): "
                  "positive = proponent (a step on it lowers the validation loss), negative = opponent.")
    si = np.asarray(valuation.columns.get("self_influence", []), float)
    if si.size:
        ok = np.isfinite(si) & (si > 0)
        rep.histogram({"training examples": np.log10(si[ok])}, title="self-influence",
                      xlabel="log10 self-influence")
        v = np.asarray(valuation.values, float)
        both = ok & np.isfinite(v)
        if both.any():
            idx = np.flatnonzero(both)
            if len(idx) > 5000:
                idx = idx[np.linspace(0, len(idx) - 1, 5000).astype(int)]
            rep.scatter(si[idx], v[idx], title="value vs self-influence (up to 5,000 examples)",
                        xlabel="self-influence", ylabel="value (influence on validation loss)", logx=True)
    q = valuation.tables.get("tracin_queries")
    if q and len(q["kind"]):
        rep.heading("Proponents and opponents of query items", level=3)
        items = list(dict.fromkeys(q["query_title"]))
        scopes = q.get("scope") or ["all"] * len(q["kind"])
        rows = []
        for t in items:
            sel = [i for i, x in enumerate(q["query_title"]) if x == t]
            n_ex = q["query_examples"][sel[0]]
            row = {"query item": f"{t} ({n_ex} examples)"}
            for scope, label in (("other-items", ""), ("all", " (all examples)")):
                for kind in ("proponent", "opponent"):
                    got = [q["title"][i] for i in sel if q["kind"][i] == kind and scopes[i] == scope]
                    if got:
                        row[f"top 2 {kind}s{label}"] = ", ".join(got[:2])
            own = sum(1 for i in sel if scopes[i] == "all" and q["kind"][i] == "proponent" and q["title"][i] == t)
            row["own item among top proponents"] = own
            rows.append(row)
        rep.table(rows, caption=f"target items of the training examples with the highest / lowest TracIn score on the "
                                f"query's {info.get('queries', {}).get('split', 'test')} examples (as the write-up's "
                                f"table: training examples whose target is another item; '(all examples)': any "
                                f"target; last column: how many of the top proponents predict the query item itself)")
        full = [{k: (q[k][i] if k != "scope" else scopes[i])
                 for k in ("query_title", "scope", "kind", "rank", "user_id", "title", "score")}
                for i in range(len(q["kind"])) if q["rank"][i] <= 5]
        rep.table(full, ["query_title", "scope", "kind", "rank", "user_id", "title", "score"],
                  caption="top 5 proponents and opponents per query (training example = user's interaction with title)",
                  number_format="{:.4g}")
    rem = info.get("removal")
    if rem and "removal_summary" in valuation.tables:
        removal_section(rep, valuation.tables["removal_summary"],
                        f"Removal experiment: retrained without the {rem['n']} strongest opponents",
                        first=("next:mrr", "next:recall@10"),
                        note=f"seeds {rem['seeds']}; opponents selected on validation; next: each test interaction "
                             f"from its preceding items; user: the job's ranking metrics")
