"""The report section of PLD (registered as ``report_sections``): it receives the report
(any object with the report's methods: ``heading``, ``table``, ``scatter``...), so the method
needs nothing from the report module."""
from __future__ import annotations



def section(rep, valuation, metrics: dict, values) -> None:
    """Per-user loss distributions of injected vs clean interactions."""
    if "loss_overlap" in valuation.info and "loss_z" in values.column_names:
        loss_overlap_section(rep, values, valuation.info["loss_overlap"])


def loss_overlap_section(rep, values, overlap: dict) -> None:
    """PLD's diagnostic (the paper's Table 2, Figures 1-3): the training losses of normal and
    injected interactions on the global scale and standardised within each user."""
    noise = values.column("is_noise").to_numpy(zero_copy_only=False).astype(bool)
    loss = values.column("train_loss").to_numpy(zero_copy_only=False)
    z = values.column("loss_z").to_numpy(zero_copy_only=False)
    rep.heading("Loss overlap: global vs personal loss distributions")
    rep.paragraph("A global loss criterion (T-CE, small loss) compares an interaction with every other; "
                  "PLD compares it with the same user's interactions only. Overlap: injected interactions "
                  "inside the normal interactions' loss range (all normal interactions vs the same user's), "
                  "and injected interactions a loss threshold at the true count misses (the n_noise largest "
                  "losses overall vs each user's n_u largest).")
    rep.histogram({"normal": loss[~noise], "injected noise": loss[noise]}, title="training loss (global)",
                  xlabel="BPR loss, mean over the last epochs")
    rep.histogram({"normal": z[~noise], "injected noise": z[noise]}, title="loss standardised within user",
                  xlabel="(loss - user mean) / user std")
    rows = []
    for kind in ("range", "threshold"):
        row = {"overlap": kind}
        for scope in ("global", "personal"):
            key = f"{kind}_overlap_{scope}"
            if key in overlap:
                row[scope] = f"{overlap[key]} ({100 * overlap[key + '_fraction']:.1f}%)"
        rows.append(row)
    rows.append({"overlap": "ROC AUC for is_noise", "global": overlap.get("auc_global_loss"),
                 "personal": overlap.get("auc_personal_z")})
    rep.table(rows, ["overlap", "global", "personal"],
              caption=f"{overlap.get('noise')} injected, {overlap.get('normal')} normal interactions")
