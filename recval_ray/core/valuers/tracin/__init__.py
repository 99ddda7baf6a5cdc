"""TracIn valuer for the LSTM next-item recommender (seed 004, "Recommender System Attribution
with TracIn"): the influence of every training example on the validation loss, proponents and
opponents of query items, and the opponent-removal experiment.

**What is valued.** A training *example* (the write-up's "training sequence") is one target
interaction with its window of previous items (:func:`~...sequences.build_windows`); it is
identified by its target's training row, so a user's first interaction, never a target, gets
``value`` NaN (never pruned). For the checkpoints of the base model's training (``checkpoints``
of them, evenly spaced up to the selected epoch, with each epoch's learning rate),

    value(z) = sum over validation examples z' of TracInCP(z, z')
             = sum_i eta_i grad l(w_i, z) . grad l(w_i, sum_z' z'),

the validation examples being every validation interaction with its true preceding window
(train + earlier validation items, :func:`~...sequences.held_out_windows`). **Sign:** positive =
a *proponent* (a step on it lowers the validation loss: useful, kept), negative = an *opponent*
(it raises the validation loss). ``self_influence`` is ``sum_i eta_i |grad l(w_i, z)|^2``.
Scores: :mod:`recval_ray.core.valuers.tracin.scores` (``variant``: ``all`` exact over every parameter,
``last-layer``, ``random-projection`` to ``projection_dim`` per parameter block).

**Query items** (``query_items``: titles or original item ids; default the write-up's seven
movies when the data has titles): a query is every ``query_split`` example whose target is the
item (default the test split, as the write-up's "test item"; descriptive only, never used to
select anything); its top ``top_k`` proponents and opponents are listed with their user, target
item and title (table ``tracin_queries``), over all training examples and over those whose
target is another item (the query item's own examples lead the proponents).

**Where.** On Ray (``on: auto`` when the job runs on Ray, or ``ray``) one actor per checkpoint
(:mod:`recval_ray.ray_layer.tracin`, a GPU each when the cluster has them) computes its
checkpoint's partial scores; the driver sums them in checkpoint order, so the values equal the
in-process path's whatever the number of actors or the order they finish.

**Removal experiment (honest).** The ``removal_n`` strongest opponents (lowest values, selected
on the validation loss only) are removed as *targets*: the model is retrained without predicting
them (their items stay in the other examples' histories,
:meth:`~...models.lstm.NextItemTask.restrict_targets`), next to the original data and to
``removal_n`` random valued examples removed (a fresh draw per seed), under ``removal_seeds``
(default three fresh seeds, ``train.seed + 1..3``: an opponent's score is partly the base run's
own noise), each model selected on validation as the base model. Effects are measured on the
**test** split only: next-item metrics (each test interaction predicted from its preceding
``window`` items, all items ranked except the user's earlier items when ``exclude_seen``: MRR,
Recall@K, NDCG@K over test examples) and the job's user-level ranking metrics
(``evaluate``). Tables ``removal_experiment`` (per seed; metric ``next:<m>`` or ``user:<m>``,
column ``protocol``) and ``removal_summary`` (mean, std, se over seeds; relative differences to
the original data paired by seed), the same layout as every method's (:mod:`...removal`). The pipeline's own ``prune`` (e.g. ``strategy: count, count:
500``) writes the pruned data without the strongest opponents' rows.

Work items (one per checkpoint, one per removal training) are kept in the run's store when it
has one, so an interrupted job resumes.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import numpy as np
import torch

from ...registry import register_valuer
from ...data import Split
from ...executor import LocalExecutor, run_items, work_fingerprint
from ...removal import long_table as removal_long_table, summarise as summarise_removal
from ...sequences import _gather_windows, build_windows, held_out_windows, pad_index
from .scores import (VARIANTS, Checkpoint, Examples, Queries, TracInSpec, checkpoint_scores, select_checkpoints,
                      sum_partials, top_k)
from ..base import MethodInfo, Resources, Valuation, ValuationContext, Valuer, require_validation

log = logging.getLogger("recval_ray.tracin")

# the write-up's query movies (its table of proponents and opponents)
WRITEUP_QUERIES = ["Return of the Jedi (1983)", "Star Trek III: The Search for Spock (1984)",
                   "L.A. Confidential (1997)", "Citizen Kane (1941)", "Top Gun (1986)", "Jaws (1975)",
                   "G.I. Jane (1997)"]


@dataclass(eq=False)
class TracInInfo(MethodInfo):
    """TracIn's run: variant, checkpoints (epochs, learning rates, seconds), the selected epoch,
    window, where it was scored, the examples valued, sign counts, the query items, the
    random-projection check and the removal experiment's settings."""
    variant: Optional[str] = None
    checkpoint_epochs: Optional[list] = None
    checkpoint_lrs: Optional[list] = None
    checkpoint_seconds: Optional[list] = None
    selected_epoch: Optional[int] = None
    window: Optional[int] = None
    scored_on: Optional[str] = None
    training_examples: Optional[int] = None
    validation_examples: Optional[int] = None
    first_interactions_not_valued: Optional[int] = None
    scoring_seconds: Optional[float] = None
    positive_values: Optional[int] = None
    negative_values: Optional[int] = None
    sign: Optional[str] = None
    projection_dim: Optional[int] = None
    queries: Optional[dict] = None
    projection_check: Optional[dict] = None
    removal: Optional[dict] = None
    seconds_total: Optional[float] = None


@dataclass
class TracInConfig:
    """Options of ``valuation.method: tracin`` (LSTM base model, trained in-process).

    ``variant``: ``all``, ``last-layer`` or ``random-projection``; ``projection_dim``: d per
    parameter block, ``projection_seed`` (null: ``train.seed``); ``checkpoints``: how many of
    the base model's epoch checkpoints (evenly spaced up to the selected epoch; 0: all);
    ``tile``: examples per gradient pass; ``query_tile``: query groups per score product;
    ``engine``: per-example gradients by ``vmap`` (``torch.func.vmap(grad)``) or ``batched``
    (one ``torch.func.grad`` of a tile's summed loss; the same numbers);
    ``device`` (null: the base model's); ``on``: ``auto`` (one Ray actor per checkpoint when the
    job runs on Ray), ``local`` or ``ray``; ``resources.cpus`` / ``resources.gpus`` per checkpoint
    actor (null GPUs: the cluster's GPUs shared by the checkpoint actors, 0 without GPUs), at most
    ``resources.max_concurrent`` alive at once (0: as many as the cluster admits).
    ``query_items``: titles or item ids (empty: the write-up's seven movies when titles are
    known, else the five most frequent ``query_split`` targets); ``top_k`` proponents and
    opponents per query. ``projection_check``: training examples (seeded sample) on which the
    other kind of scores (random projection for an exact variant, exact for the projection) is
    computed and correlated (0: off). Removal experiment: ``removal_n`` examples (0: off),
    ``removal_seeds`` (empty: ``train.seed + 1, + 2, + 3``), ``removal_ks`` cut-offs of the
    next-item metrics, ``exclude_seen``; ``resources.actors``: Ray actors for the removal
    trainings (0: in-process).
    """
    method: str = "tracin"
    variant: Literal["all", "last-layer", "random-projection"] = "all"
    projection_dim: int = 4096
    projection_seed: Optional[int] = None
    checkpoints: int = 5
    tile: int = 512
    query_tile: int = 16
    engine: Literal["vmap", "batched"] = "vmap"
    device: Optional[str] = None
    on: Literal["auto", "local", "ray"] = "auto"
    query_items: list[Union[int, str]] = field(default_factory=list)
    query_split: Literal["valid", "test"] = "test"
    top_k: int = 10
    projection_check: int = 2000
    removal_n: int = 500
    removal_seeds: list[int] = field(default_factory=list)
    removal_ks: list[int] = field(default_factory=lambda: [10, 20])
    exclude_seen: bool = True
    resources: Resources = field(default_factory=lambda: Resources(gpus=None))

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"valuation.variant: {self.variant!r} is not one of {', '.join(VARIANTS)}")
        for key in ("projection_dim", "tile", "query_tile", "top_k"):
            if getattr(self, key) < 1:
                raise ValueError(f"valuation.{key}: {getattr(self, key)} must be >= 1")
        self.resources.validate()
        for key in ("checkpoints", "projection_check", "removal_n"):
            if getattr(self, key) < 0:
                raise ValueError(f"valuation.{key}: {getattr(self, key)} must be >= 0")
        if any(k < 1 for k in self.removal_ks):
            raise ValueError(f"valuation.removal_ks: {self.removal_ks} must be positive")


# ---------------------------------------------------------------------------------------
# next-item evaluation (the write-up's protocol)
# ---------------------------------------------------------------------------------------
def next_item_metrics(model, parts: list, ks=(10, 20), exclude_seen: bool = True, batch: int = 1024,
                      per_example: bool = False) -> dict:
    """Each row of ``parts[-1]`` predicted from its user's preceding ``model.window`` items over
    the union of ``parts`` (time order, ties: earlier part first): ``mrr`` (1 / rank over all
    items), ``recall@K`` (= hit@K, one target), ``ndcg@K`` (1 / log2(rank + 1) within K), averaged
    over the examples (a held-out row that is its user's first interaction has no history and
    is left out: ``n``). ``exclude_seen``: the user's earlier items (every part, up to the
    target) are not ranked. Ties: a tied item with a lower index ranks first."""
    n_items, W = parts[0].n_items, int(model.window)
    union_user = np.concatenate([p.user for p in parts])
    union_item = np.concatenate([p.item for p in parts])
    ts = np.concatenate([np.asarray(p.timestamp) for p in parts])
    order = np.lexsort((np.arange(len(union_user)), ts, union_user))
    su, seq = union_user[order], union_item[order]
    counts = np.bincount(su, minlength=parts[0].n_users).astype(np.int64)
    starts = np.cumsum(counts) - counts
    rank_in_user = np.arange(len(su), dtype=np.int64) - starts[su]
    offset = len(union_user) - len(parts[-1])
    pos = np.flatnonzero((order >= offset) & (rank_in_user >= 1))
    start = starts[su[pos]]
    hist = _gather_windows(seq, pos, start, W, pad_index(n_items))
    target = seq[pos]
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    ranks = np.zeros(len(pos), dtype=np.int64)
    with torch.no_grad():
        for s in range(0, len(pos), batch):
            e = min(len(pos), s + batch)
            sc = model(torch.as_tensor(hist[s:e], device=dev)).float().clone()
            y = torch.as_tensor(target[s:e], device=dev)
            rows = torch.arange(e - s, device=dev)
            st = sc[rows, y].clone()
            if exclude_seen:
                L = pos[s:e] - start[s:e]
                r = np.repeat(np.arange(e - s), L)
                k = np.arange(int(L.sum())) - np.repeat(np.cumsum(L) - L, L) + np.repeat(start[s:e], L)
                sc[torch.as_tensor(r, device=dev), torch.as_tensor(seq[k], device=dev)] = -torch.inf
                sc[rows, y] = st
            idx = torch.arange(n_items, device=dev)[None, :]
            better = (sc > st[:, None]) | ((sc == st[:, None]) & (idx < y[:, None]))
            ranks[s:e] = (better.sum(1) + 1).cpu().numpy()
    model.train(was)
    out = {"n": int(len(ranks)), "mrr": float(np.mean(1.0 / ranks)) if len(ranks) else float("nan")}
    for k in ks:
        hit = ranks <= k
        out[f"recall@{k}"] = float(hit.mean()) if len(ranks) else float("nan")
        out[f"ndcg@{k}"] = float(np.mean(np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0))) if len(ranks) else float("nan")
    if per_example:
        out["ranks"] = ranks
    return out


# ---------------------------------------------------------------------------------------
# removal trainings (work items, run on the executor)
# ---------------------------------------------------------------------------------------
def run_removal_item(shared: dict, item: dict) -> dict:
    """Train the LSTM under ``item["seed"]`` without the targets ``item["drop"]`` (training rows),
    select on validation, evaluate on test. Ray-free; runs on actors."""
    from ...evaluation import evaluate_ranking
    from ...train import build_task, fit
    torch.set_num_threads(max(1, int(shared.get("threads", 1))))
    t0 = time.perf_counter()
    split: Split = shared["split"]
    tcfg = dataclasses.replace(shared["train_cfg"], seed=int(item["seed"]))
    task = build_task(shared["model_cfg"], split.train, tcfg)
    drop = np.asarray(item["drop"], np.int64)
    keep = np.ones(len(split.train), dtype=bool)
    keep[drop] = False
    n_examples = task.restrict_targets(keep)
    res = fit(task, tcfg, valid=split.valid, exclude=[split.train], eval_cfg=shared["eval_cfg"], track_losses=False)
    model = res.model
    nxt = next_item_metrics(model, [split.train, split.valid, split.test], shared["ks"], shared["exclude_seen"])
    usr = evaluate_ranking(model, split, shared["eval_cfg"], "test")
    names = [f"next:{k}" for k in nxt if k != "n"] + [f"user:{k}" for k in usr]
    vals = [nxt[k] for k in nxt if k != "n"] + [usr[k] for k in usr]
    return {"names": np.asarray(names), "values": np.asarray(vals, np.float64),
            "examples": np.int64(n_examples), "best_epoch": np.int64(res.best_epoch),
            "epochs_run": np.int64(res.epochs_run), "seconds": np.float64(time.perf_counter() - t0)}


def _checkpoint_item(shared: dict, item: dict) -> dict:
    torch.set_num_threads(max(1, int(shared.get("threads", 1))))
    return checkpoint_scores(item["checkpoint"], item["index"], shared["train"], shared["queries"],
                             shared["spec"], shared.get("device"))


# ---------------------------------------------------------------------------------------
# the valuer
# ---------------------------------------------------------------------------------------
class TracInValuer(Valuer):
    name = "tracin"

    def value(self, ctx: ValuationContext) -> Valuation:
        o: TracInConfig = self.options
        o.validate()
        t_start = time.perf_counter()
        split = ctx.split
        train = split.train
        model = getattr(ctx.base, "model", None)
        if getattr(ctx.model_cfg, "kind", None) != "lstm" or model is None:
            raise ValueError(f"valuation.method tracin needs the LSTM next-item model (model.kind: lstm), "
                             f"got model.kind {getattr(ctx.model_cfg, 'kind', None)!r}")
        paths = select_checkpoints(ctx.base.history, int(ctx.base.best_epoch), int(o.checkpoints))
        if not paths:
            raise ValueError("valuation.method tracin needs the base model's per-epoch checkpoints; train it "
                             "in-process (train.workers: 0, train.use_gpu: false)")
        if len(split.valid) == 0:
            raise ValueError("valuation.method tracin values the training data on the validation loss: "
                             "the split needs a validation part (e.g. split.ratios [0.8, 0.1, 0.1])")
        checkpoints = [Checkpoint.load(p) for p in paths]
        W = int(model.window)

        # training examples (one per target training row), validation examples, query examples
        hist, target, rows = build_windows(train, W)
        train_ex = Examples(hist, target)
        v_hist, v_target, _ = held_out_windows([train, split.valid], W)
        valid_q = Queries(Examples(v_hist, v_target), np.zeros(len(v_target), np.int64), 1)
        q_parts = [train, split.valid] + ([split.test] if o.query_split == "test" else [])
        q_hist, q_target, _ = held_out_windows(q_parts, W)
        q_items, q_labels = self._query_items(ctx, q_target)
        groups = [np.flatnonzero(q_target == i) for i in q_items]
        sel = np.concatenate(groups) if groups else np.zeros(0, np.int64)
        item_q = Queries(Examples(q_hist[sel], q_target[sel]),
                         np.repeat(np.arange(len(groups)), [len(g) for g in groups]), len(groups))
        queries = Queries.concat([valid_q, item_q])
        seed = int(ctx.seed if o.projection_seed is None else o.projection_seed)
        spec = TracInSpec(variant=o.variant, projection_dim=o.projection_dim, seed=seed, tile=o.tile,
                          query_tile=o.query_tile, engine=o.engine)
        device = o.device or str(next(model.parameters()).device)

        # per-checkpoint scores, in-process or one Ray actor per checkpoint
        t0 = time.perf_counter()
        where = self._where(ctx)
        partials = self._checkpoint_partials(ctx, checkpoints, train_ex, queries, spec, device, where,
                                             fingerprint(ctx, o, scores_only=True))
        total = sum_partials(partials)
        score_s = time.perf_counter() - t0
        scores, self_inf = total["scores"], total["self_influence"]

        n = len(train)
        values = np.full(n, np.nan)
        values[rows] = scores[:, 0]
        self_col = np.full(n, np.nan)
        self_col[rows] = self_inf
        info = TracInInfo(variant=o.variant, checkpoint_epochs=total["epochs"], checkpoint_lrs=total["lrs"],
                          checkpoint_seconds=[round(s, 2) for s in total["checkpoint_seconds"]],
                          selected_epoch=int(ctx.base.best_epoch), window=W, scored_on=where,
                          training_examples=int(len(rows)), validation_examples=int(len(v_target)),
                          first_interactions_not_valued=int(n - len(rows)), scoring_seconds=round(score_s, 2),
                          positive_values=int((scores[:, 0] > 0).sum()),
                          negative_values=int((scores[:, 0] < 0).sum()),
                          sign="value > 0: proponent (a step on it lowers the validation loss); < 0: opponent")
        if o.variant == "random-projection":
            info["projection_dim"] = o.projection_dim
        tables = {"tracin_queries": self._query_table(ctx, scores[:, 1:], rows, q_items, q_labels, groups, o.top_k)}
        info["queries"] = {"split": o.query_split,
                           "items": [{"item": lab, "examples": int(len(g))} for lab, g in zip(q_labels, groups)]}
        if o.projection_check > 0:
            info["projection_check"] = self._projection_check(checkpoints, train_ex, queries, spec, device,
                                                              scores, self_inf, o, seed)
        opp = np.zeros(n, dtype=bool)
        if o.removal_n > 0:
            removal, opp_rows = self._removal(ctx, values, rows, info, fingerprint(ctx, o))
            if removal:
                tables["removal_experiment"] = removal
                tables["removal_summary"] = summarise_removal(removal, baseline="original")
            opp[opp_rows] = True
        info["seconds_total"] = round(time.perf_counter() - t_start, 2)
        return Valuation(method=self.name, values=values,
                         columns={"self_influence": self_col, "tracin_opponent_removed": opp},
                         tables=tables, info=info)

    # -- queries -------------------------------------------------------------------------
    def _query_items(self, ctx, q_target: np.ndarray) -> tuple[list[int], list[str]]:
        o: TracInConfig = self.options
        ds = ctx.dataset
        titles = getattr(ds, "item_titles", None)
        title_list = titles.to_pylist() if titles is not None else None
        wanted = list(o.query_items)
        if not wanted:
            if title_list is not None:
                wanted = list(WRITEUP_QUERIES)
            else:
                counts = np.bincount(q_target, minlength=ctx.split.train.n_items)
                top = np.lexsort((np.arange(len(counts)), -counts))[:5]
                return [int(i) for i in top if counts[i] > 0], [self._label(ctx, int(i)) for i in top if counts[i] > 0]
        counts = ctx.split.train.item_counts()
        items, labels = [], []
        for w in wanted:
            idx = None
            if isinstance(w, str) and title_list is not None:
                exact = [i for i, t in enumerate(title_list) if t == w]
                if not exact:
                    low = w.lower()
                    exact = [i for i, t in enumerate(title_list) if t and low in t.lower()]
                if exact:
                    idx = max(exact, key=lambda i: (counts[i], -i))
            elif ds is not None:
                ids = ds.item_ids.to_pylist()
                key = int(w) if isinstance(w, (int, np.integer)) or str(w).lstrip("-").isdigit() else w
                if key in ids:
                    idx = ids.index(key)
            if idx is None:
                log.warning("tracin: query item %r not found in the data; skipped", w)
                continue
            items.append(int(idx))
            labels.append(self._label(ctx, int(idx)))
        return items, labels

    @staticmethod
    def _label(ctx, item: int) -> str:
        ds = ctx.dataset
        if ds is None:
            return str(item)
        titles = getattr(ds, "item_titles", None)
        if titles is not None and titles[item].is_valid:
            return str(titles[item].as_py())
        return str(ds.item_ids[item].as_py())

    def _query_table(self, ctx, qscores: np.ndarray, rows: np.ndarray, items, labels, groups, k) -> dict:
        """Top ``k`` proponents and opponents of every query, over all training examples
        (``scope: all``; the query item's own training examples usually lead the proponents)
        and over the examples whose target is another item (``scope: other-items``, the
        write-up's table lists other movies)."""
        train = ctx.split.train
        ds = ctx.dataset
        target_item = train.item[rows]
        out = {"query_item_id": [], "query_title": [], "query_examples": [], "scope": [], "kind": [], "rank": [],
               "user_id": [], "item_id": [], "title": [], "score": []}
        for g, (item, lab, ex) in enumerate(zip(items, labels, groups)):
            if len(ex) == 0:
                continue
            for scope in ("all", "other-items"):
                sc = qscores[:, g] if scope == "all" else np.where(target_item == item, np.nan, qscores[:, g])
                for kind, prop in (("proponent", True), ("opponent", False)):
                    for r, e in enumerate(top_k(sc, k, proponents=prop)):
                        row = rows[e]
                        out["query_item_id"].append(str(ds.item_ids[item].as_py()) if ds is not None else str(item))
                        out["query_title"].append(lab)
                        out["query_examples"].append(int(len(ex)))
                        out["scope"].append(scope)
                        out["kind"].append(kind)
                        out["rank"].append(r + 1)
                        out["user_id"].append(str(ds.user_ids[int(train.user[row])].as_py()) if ds is not None
                                              else str(int(train.user[row])))
                        it = int(train.item[row])
                        out["item_id"].append(str(ds.item_ids[it].as_py()) if ds is not None else str(it))
                        out["title"].append(self._label(ctx, it))
                        out["score"].append(float(qscores[e, g]))
        return out

    # -- where the checkpoints are scored ------------------------------------------------
    def _where(self, ctx) -> str:
        o: TracInConfig = self.options
        if o.on == "local":
            return "local"
        ray_up = ctx.distributed is not None
        if o.on == "ray" and not ray_up:
            raise ValueError("valuation.on: ray needs Ray (run the job with Ray, or set on: local)")
        return "ray" if ray_up else "local"

    def _checkpoint_partials(self, ctx, checkpoints, train_ex, queries, spec, device, where, fp) -> list:
        o: TracInConfig = self.options
        keys = [f"{fp}/checkpoint-{c.epoch:04d}" for c in checkpoints]
        log.info("tracin (%s): %d checkpoints (epochs %s) x %d training examples x %d queries, %s",
                 spec.variant, len(checkpoints), [c.epoch for c in checkpoints], len(train_ex), queries.n_groups,
                 "one Ray actor per checkpoint" if where == "ray" else "in-process")
        items = [{"checkpoint": c, "index": i} for i, c in enumerate(checkpoints)]
        shared = {"train": train_ex, "queries": queries, "spec": spec, "device": device,
                  "threads": torch.get_num_threads()}
        executor = _CheckpointActors(ctx.distributed, o) if where == "ray" else LocalExecutor()
        partials, _ = run_items(
            _checkpoint_item, shared, items, keys, executor=executor, store=ctx.store, label="tracin checkpoints",
            unit="checkpoints", logger=log,
            accept=lambda got: got["scores"].shape == (len(train_ex), queries.n_groups),
            on_result=lambda i, res: log.info("tracin: checkpoint epoch %d scored in %.1f s",
                                              checkpoints[i].epoch, float(res["seconds"])))
        return partials

    # -- random projection vs exact --------------------------------------------------------
    def _projection_check(self, checkpoints, train_ex, queries, spec, device, scores, self_inf, o, seed) -> dict:
        """Correlation of the random-projection and exact scores on a seeded sample of training
        examples (the other variant computed on the sample only)."""
        from scipy.stats import pearsonr, spearmanr
        t0 = time.perf_counter()
        rng = np.random.default_rng([seed, 0x5EED])
        m = min(int(o.projection_check), len(train_ex))
        sample = np.sort(rng.choice(len(train_ex), size=m, replace=False))
        other = "all" if spec.variant == "random-projection" else "random-projection"
        ospec = dataclasses.replace(spec, variant=other)
        res = sum_partials([checkpoint_scores(c, i, train_ex.take(sample), queries, ospec, device)
                            for i, c in enumerate(checkpoints)])
        exact_s, proj_s = (scores[sample], res["scores"]) if other == "random-projection" else (res["scores"], scores[sample])
        exact_si, proj_si = (self_inf[sample], res["self_influence"]) if other == "random-projection" else \
            (res["self_influence"], self_inf[sample])

        def corr(a, b):
            ok = np.isfinite(a) & np.isfinite(b)
            if ok.sum() < 3 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
                return float("nan"), float("nan")
            return float(pearsonr(a[ok], b[ok]).statistic), float(spearmanr(a[ok], b[ok]).statistic)
        pv, sv = corr(exact_s[:, 0], proj_s[:, 0])
        pq, sq = corr(exact_s[:, 1:].ravel(), proj_s[:, 1:].ravel()) if exact_s.shape[1] > 1 else (float("nan"),) * 2
        ps, ss = corr(exact_si, proj_si)
        return {"projection_dim": int(o.projection_dim), "sample": int(m), "compared_with": other,
                "pearson_value": pv, "spearman_value": sv, "pearson_queries": pq, "spearman_queries": sq,
                "pearson_self_influence": ps, "spearman_self_influence": ss,
                "seconds": round(time.perf_counter() - t0, 2)}

    # -- removal experiment --------------------------------------------------------------
    def _removal(self, ctx, values: np.ndarray, rows: np.ndarray, info: dict, fp: str):
        o: TracInConfig = self.options
        n = int(o.removal_n)
        valued = np.flatnonzero(np.isfinite(values))
        if len(valued) < 2 * n or len(ctx.split.test) == 0:
            log.warning("tracin: removal experiment skipped (%d valued examples, %d test rows)", len(valued),
                        len(ctx.split.test))
            return {}, np.zeros(0, np.int64)
        opp = valued[top_k(values[valued], n, proponents=False)]
        seeds = list(o.removal_seeds) or [int(ctx.train_cfg.seed) + k for k in (1, 2, 3)]
        items, keys = [], []
        for s in seeds:
            rnd = np.sort(np.random.default_rng([int(s), 0xD20B]).choice(valued, size=n, replace=False))
            for variant, drop in (("original", np.zeros(0, np.int64)), ("opponents_removed", np.sort(opp)),
                                  ("random_removed", rnd)):
                items.append({"seed": int(s), "variant": variant, "drop": drop})
                keys.append(f"{fp}/removal-{variant}-seed{s}")
        shared = {"split": ctx.split, "model_cfg": ctx.model_cfg, "train_cfg": ctx.train_cfg,
                  "eval_cfg": ctx.eval_cfg, "ks": list(o.removal_ks), "exclude_seen": bool(o.exclude_seen),
                  "threads": max(1, int(o.resources.cpus)) if o.resources.actors else torch.get_num_threads()}
        log.info("tracin removal experiment: %d trainings (%d seeds x original / %d opponents removed / %d random "
                 "removed)", len(items), len(seeds), n, n)
        t0 = time.perf_counter()

        def trained(i, res):
            log.info("tracin removal: %s seed %d trained (%d epochs, selected %d) in %.1f s",
                     items[i]["variant"], items[i]["seed"], int(res["epochs_run"]), int(res["best_epoch"]),
                     float(res["seconds"]))
        results, _ = run_items(run_removal_item, shared, items, keys, executor=ctx.executor, store=ctx.store,
                               label="tracin removal", unit="trainings", logger=log, on_result=trained)
        names = [str(x) for x in results[0]["names"]]
        variants = ["original", "opponents_removed", "random_removed"]
        grid = np.stack([np.stack([np.asarray(results[i]["values"], np.float64) for i in range(s * 3, s * 3 + 3)])
                         for s in range(len(seeds))])                       # [seed, variant, metric]
        per_training = {c: np.asarray([[int(results[s * 3 + v][c]) for v in range(3)] for s in range(len(seeds))])
                        for c in ("examples", "best_epoch")}
        protocol = np.broadcast_to(np.asarray(["next-item" if n.startswith("next:") else "user-ranking"
                                               for n in names]), grid.shape)
        table = removal_long_table(variants, seeds, names, grid, extra={"protocol": protocol, **per_training})
        info["removal"] = {"n": n, "seeds": seeds, "opponents_negative": int((values[opp] < 0).sum()),
                           "opponent_value_max": float(values[opp].max()),
                           "seconds": round(time.perf_counter() - t0, 2),
                           "note": "opponents selected on the validation loss; metrics on the test split"}
        return table, opp


def fingerprint(ctx: ValuationContext, opts: TracInConfig, scores_only: bool = False) -> str:
    """What stored work items depend on (:func:`...executor.work_fingerprint`): data, split,
    model, training and TracIn settings, not where or how they run; ``scores_only``: the
    checkpoint scores', which the removal experiment's settings do not change."""
    ignore = ("resources", "on",
              "device", "tile", "query_tile", "projection_check", "engine", "top_k")
    if scores_only:
        ignore += ("removal_n", "removal_seeds", "removal_ks", "exclude_seen")
    return work_fingerprint("tracin", ctx, dataclasses.asdict(opts), ignore=ignore)


class _CheckpointActors:
    """The executor port over the distributed port's checkpoint actors (one per checkpoint)."""

    def __init__(self, distributed, options):
        self.distributed, self.o = distributed, options

    def map(self, fn, shared, items, on_result) -> None:
        o = self.o
        self.distributed.checkpoint_scores([it["checkpoint"] for it in items], [it["index"] for it in items],
                                           shared["train"], shared["queries"], shared["spec"],
                                           num_cpus=o.resources.cpus, num_gpus=o.resources.gpus, device=o.device,
                                           max_concurrent=o.resources.max_concurrent, on_result=on_result)


def peak_bytes(job, size) -> tuple:
    """``(bytes, why)``: TracIn's peak while scoring a checkpoint (``variant: all``; the other
    variants hold less). A tile of ``tile`` training examples holds about 11 item-sized float32
    vectors per example (logits, softmax, their gradients, the output-layer products) and ~0.41
    MB of per-example LSTM gradients; the query gradients ``query_tile x items x (dim + hidden
    + 1)`` twice. Fitted to measured peaks (one thread; 2k / 8k / 16k items, tiles of 128 / 512,
    8 / 32 query groups: 374 / 539 / 684 / 218 / 567 MB) with a 25% margin."""
    o, m = job.valuation, job.model
    I, tile = int(size.n_items), int(o.tile)
    d, h = int(getattr(m, "dim", 64)), int(getattr(m, "hidden", 64))
    per_tile = tile * (0.41 * 2 ** 20 + 45 * I)
    queries = 2 * int(o.query_tile) * I * (d + h + 1) * 4
    need = int(1.25 * (122 * 2 ** 20 + per_tile + queries))
    why = (f"{I:,} items x valuation.tile {tile} training examples per gradient pass take "
           f"{per_tile / 2 ** 30:.1f} GiB; lower valuation.tile (or query_tile), or run on a larger machine")
    return need, why


def check_job(job) -> None:
    """TracIn values each example by its influence on the validation loss."""
    require_validation(job, "valuation.method tracin (values are influences on the validation loss)")


@register_valuer("tracin", TracInConfig, requires=("sequential", "checkpoints"), in_process_training=True, check=check_job,
                 peak_bytes=peak_bytes,
                 work_items=True,
                 report_sections=("recval_ray.core.valuers.tracin.report:section",))
def build_tracin(opts: TracInConfig) -> TracInValuer:
    opts.validate()
    return TracInValuer(opts)
