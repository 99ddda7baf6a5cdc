"""Deletion diagnostics: the influence of a user or an item is what the recommender loses
when it is retrained without it (after "Model-agnostic post-hoc explainability for
recommender systems", seed 002).

For an entity ``e`` (a user, or an item: a group of training rows) and a metric ``M``,

    influence_M(e) = M(model trained on D) - M(model trained on D without e's rows),

measured on the validation split (``protocol: validation``; the paper measured on the test
split it also reports on: ``protocol: test-same``). With ``self_eval: exclude`` (default) the
entity's own held-out rows leave both evaluations (a user removed from training cannot be
judged on its own test items; the paper kept them: ``self_eval: include``). ``value`` is the
influence on ``valuation.metric`` (sign flipped for error metrics), so higher = more useful.

How the models are trained (``engine``):

* ``batched`` (NCF, biased-MF SVD, MF-BPR): :mod:`.stacked`, one stack per shard of
  entities with the full model as model 0; every model shares the initialisation and batch
  stream (common random numbers), so an influence is the deletion, not seed noise;
* ``closed-form`` (PureSVD): the truncated SVD of the training matrix without the entity's
  rows (users are folded in, ``P = R V``), one ``svds`` per entity; seeds do not apply;
* ``sequential`` (any model): one model per entity, retrained from the same seeded
  initialisation on the rows that remain, for the same number of epochs.

Every entity is valued under ``seeds`` seeds (``train.seed``, ``train.seed + 1``, ...); its
value is the mean and ``value_se`` the standard error over seeds. Work items (seed x shard of
``shard_size`` entities) run on the executor (Ray actors in the Ray layer) and are persisted
in the run's store as they finish, so an interrupted job resumes; a shard's result depends
only on its seed and entities, never on the number of workers or the finishing order.

The removal experiment (paper Tables 5, 6, 8, 9) retrains without the ``removal_n`` most, the
``removal_n`` least influential and ``removal_n`` random valued entities, under as many fresh
seeds as the valuation used (seeds it did not use: an entity's influence under one seed is
partly that seed's noise, which a same-seed experiment would count as an effect), and reports the metrics on the test split (rows of all removed entities excluded for every
variant) with relative differences to the full model and their standard errors over seeds.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ...registry import register_valuer
from ...data import Interactions, Split
from ...executor import run_items, work_fingerprint
from ...removal import long_table as removal_long_table, summarise as summarise_removal
from ...metrics import ranking_metrics, rating_metrics, scores_fn_from_matrix
from ...stats import standard_error
from ..base import MethodInfo, Resources, Valuation, ValuationContext, Valuer, require_validation

log = logging.getLogger("recval_ray.deletion")

RATING = ("mae", "rmse", "explained_variance")
LOWER_IS_BETTER = ("mae", "rmse")
PAPER_METRICS = ["map", "map@10", "ndcg@10", "precision@10", "recall@10", "explained_variance", "mae"]


@dataclass(eq=False)
class DeletionInfo(MethodInfo):
    """Deletion diagnostics: the entity kind and id column, engine, seeds, the metric valued
    and those measured, the protocol, the work done (items run / resumed), the values'
    stability over seeds and the removal experiment's groups and seeds."""
    entity: Optional[str] = None
    id_column: Optional[str] = None
    engine: Optional[str] = None
    seeds: Optional[list] = None
    entities_valued: Optional[int] = None
    metric: Optional[str] = None
    metrics: Optional[list] = None
    protocol: Optional[str] = None
    influence_split: Optional[str] = None
    self_eval: Optional[bool] = None
    removed_items: Optional[str] = None
    values_from: Optional[str] = None
    epochs: Optional[int] = None
    shard_size: Optional[int] = None
    actors: Optional[int] = None
    work_items: Optional[int] = None
    train_seconds_sum: Optional[float] = None
    stability_spearman_halves: Optional[float] = None
    stability_halves: Optional[list] = None
    stability_spearman_seed_pairs_mean: Optional[float] = None
    removal: Optional[dict] = None
    removal_seeds: Optional[list] = None
    work_items_resumed: Optional[list] = None
    work_items_run: Optional[list] = None


@dataclass
class DeletionConfig:
    """Options of ``valuation.method: deletion``.

    ``entity``: ``user``, ``item`` or ``column`` (the groups are the distinct values of the
    input's column ``group_column``, e.g. a country, a device or a session; rows without a
    value, and injected noise, belong to no group and are never dropped);
    ``metric``: the influence used as ``value``;
    ``metrics``: every influence computed (``map`` / ``mrr`` = full ranking, ``name@K``,
    ``mae``, ``rmse``, ``explained_variance``: rating metrics on the held-out rows' ratings;
    an implicit model's rating is its predicted probability, as in the paper);
    ``entities``: ``all``, ``sample`` (``n_entities`` drawn with ``sample_seed``) or ``top``
    (the ``n_entities`` with most training rows); ``seeds``: number of training seeds;
    ``engine``: ``auto`` (batched for NCF and SVD, closed form for PureSVD, else sequential),
    ``batched``, ``closed-form`` or ``sequential``; ``epochs``: training epochs of every
    retrained model (null: ``train.epochs``); ``shard_size``: entities per work item;
    ``resources``: ``actors`` Ray actors (0: in-process), each with ``cpus`` CPUs and ``gpus``
    GPUs; ``protocol``: ``validation`` (influence on validation, removal effect on test) or
    ``test-same`` (both on test, the paper's); ``self_eval``: ``exclude`` or ``include``;
    ``removal_n``: entities per group of the removal experiment (0: no experiment);
    ``removal_seeds``: ``fresh`` (default: the experiment retrains under seeds the valuation did
    not use, ``train.seed + seeds`` on, so the selection's own seed noise cannot carry over)
    or ``same`` (the valuation's seeds); ``removed_items`` (item entities): ``drop`` (default:
    an item whose held-out rows leave the evaluation also leaves every compared model's
    candidates) or ``rank`` (it stays a candidate: a model without it stops recommending it
    while the full model's slots on it no longer count, which inflates the gain of removing
    popular items; kept for comparison); ``values_from``: the ``<entity>_values`` table of an
    earlier run (path or URI) whose values are taken instead of recomputed, e.g. to run the
    removal experiment again under other settings.
    """
    method: str = "deletion"
    entity: Literal["user", "item", "column"] = "user"
    group_column: Optional[str] = None
    metric: str = "map"
    metrics: list[str] = field(default_factory=lambda: list(PAPER_METRICS))
    entities: Literal["all", "sample", "top"] = "all"
    n_entities: int = 100
    sample_seed: int = 0
    seeds: int = 3
    engine: Literal["auto", "batched", "closed-form", "sequential"] = "auto"
    epochs: Optional[int] = None
    shard_size: int = 128
    resources: Resources = field(default_factory=Resources)
    protocol: Literal["validation", "test-same"] = "validation"
    self_eval: Literal["exclude", "include"] = "exclude"
    removal_n: int = 10
    removal_seeds: Literal["fresh", "same"] = "fresh"
    removed_items: Literal["drop", "rank"] = "drop"
    values_from: Optional[str] = None

    def validate(self) -> None:
        _check_metrics(list(self.metrics) + [self.metric])
        if self.seeds < 1 or self.shard_size < 1 or self.n_entities < 1:
            raise ValueError("valuation.seeds, valuation.shard_size and valuation.n_entities must be >= 1")
        if (self.entity == "column") != bool(self.group_column):
            raise ValueError("valuation.group_column is needed with valuation.entity: column, and only then")
        if self.removal_n < 0:
            raise ValueError("valuation.removal_n must be >= 0")
        self.resources.validate()


@dataclass
class Grouping:
    """The entities of a deletion run: ``rows[part]`` is the entity index of each row of the
    split's ``train``/``valid``/``test`` part (``-1``: the row belongs to no entity);
    ``id_column`` names the entity's id in the outputs (``user_id``, ``item_id`` or the
    grouping column's own name)."""
    kind: str
    id_column: str
    rows: dict
    n_groups: int
    _labels: Callable

    def labels(self, idx, arrow: bool = False):
        """Original ids (user / item ids, or the column's values) of entity indices."""
        out = self._labels(np.asarray(idx, np.int64))
        if arrow:
            return out
        return out.to_pylist() if hasattr(out, "to_pylist") else [int(x) for x in out]

    @staticmethod
    def of(opts: DeletionConfig, split: Split, dataset) -> "Grouping":
        parts = {p: getattr(split, p) for p in ("train", "valid", "test")}
        if opts.entity in ("user", "item"):
            kind = opts.entity
            rows = {p: getattr(t, kind).astype(np.int64) for p, t in parts.items()}
            n = split.train.n_users if kind == "user" else split.train.n_items
            if dataset is None:
                labels = lambda idx: idx  # noqa: E731
            else:
                labels = dataset.original_users if kind == "user" else dataset.original_items
            return Grouping(kind, f"{kind}_id", rows, int(n), labels)
        col = opts.group_column
        source = getattr(dataset, "source", None)
        if source is None or any(t.source_row is None for t in parts.values()):
            raise ValueError(f"valuation.entity: column needs the input's rows (column {col!r}); "
                             "this data has no source table")
        if col not in source.column_names:
            raise ValueError(f"valuation.group_column: the input has no column {col!r} "
                             f"(its columns: {', '.join(source.column_names)})")
        enc = pc.dictionary_encode(source.column(col).combine_chunks())
        codes = np.asarray(enc.indices.fill_null(-1).to_numpy(zero_copy_only=False), np.int64)
        dictionary = enc.dictionary
        rows = {}
        for p, t in parts.items():
            sr = np.asarray(t.source_row, np.int64)
            rows[p] = np.where(sr >= 0, codes[np.clip(sr, 0, None)] if len(codes) else -1, -1)
        return Grouping(col, col, rows, int(len(dictionary)),
                        lambda idx: dictionary.take(pa.array(idx, pa.int64())))


def _ranking_spec(name: str) -> str:
    return {"map": "map_full", "mrr": "mrr_full"}.get(name, name)


# ---------------------------------------------------------------------------------------
# evaluation of a family of models on one held-out part
# ---------------------------------------------------------------------------------------
class _Evaluator:
    """Metrics of models on ``target`` (held-out rows), ``exclude`` removed from rankings.
    ``groups``: the entity of each target row (user or item index).

    ``drop_removed_items`` (item entities): when an item's held-out rows leave the target, the
    item also leaves every compared model's candidate list. Otherwise a model trained without
    the item stops recommending it while the full model still fills top-K slots with it (hits
    that no longer count), and removing popular items looks like a large gain."""

    def __init__(self, target: Interactions, exclude: list, names: list, eval_cfg, groups: np.ndarray,
                 kind: str, device, drop_removed_items: bool = True):
        self.target, self.exclude, self.names = target, exclude, names
        self.drop_items = kind == "item" and drop_removed_items
        self.rank = [n for n in names if n not in RATING]
        self.rate = [n for n in names if n in RATING]
        self.kw = dict(ndcg_variant=eval_cfg.ndcg_variant, recall_variant=eval_cfg.recall_variant,
                       users=eval_cfg.users, batch_users=eval_cfg.batch_users, device=device)
        self.groups, self.kind, self.device = groups, kind, device
        if self.rate and target.rating is None:
            raise ValueError(f"valuation.metrics {self.rate} need ratings in the data")

    def _ranking(self, score_fn, target: Interactions, removed=None) -> dict:
        if not self.rank:
            return {}
        exclude = self.exclude
        if self.drop_items and removed is not None and len(removed):
            items = np.unique(np.asarray(removed, np.int64))
            n_u = target.n_users
            exclude = exclude + [Interactions(np.repeat(np.arange(n_u), len(items)), np.tile(items, n_u),
                                              n_u, target.n_items)]
        return ranking_metrics(score_fn, target, exclude, metrics=[_ranking_spec(n) for n in self.rank],
                               ks=[], **self.kw)

    def predictions(self, model) -> np.ndarray:
        if not self.rate:
            return np.zeros(0)
        t = self.target
        with torch.no_grad():
            u = torch.as_tensor(t.user, dtype=torch.long, device=self.device)
            i = torch.as_tensor(t.item, dtype=torch.long, device=self.device)
            p = model.predict(u, i).float()
            if not getattr(model, "explicit", False) and hasattr(model, "out"):
                p = torch.sigmoid(p)         # an implicit NCF's "rating": its probability
        return p.cpu().numpy().astype(np.float64)

    def _rating(self, pred: np.ndarray, rows: np.ndarray) -> dict:
        if not self.rate:
            return {}
        r = rating_metrics(pred[rows], self.target.rating[rows])
        return {n: r[n] for n in self.rate}

    def per_user(self, score_fn) -> tuple[np.ndarray, np.ndarray]:
        out = ranking_metrics(score_fn, self.target, self.exclude, metrics=[_ranking_spec(n) for n in self.rank],
                              ks=[], per_user=True, **self.kw)
        return out["users"], np.stack([out[n] for n in self.rank], 1) if self.rank else np.zeros((len(out["users"]), 0))

    def evaluate(self, models, sets: list, union: bool, self_exclude: bool) -> tuple[np.ndarray, np.ndarray]:
        """``models(j)`` -> module of model j (j = 0: the full model). Returns
        ``(full [n, m], model [n, m])``: model j's metrics and the full model's on the same
        rows (the target minus set j's rows when ``self_exclude``, minus every set's rows when
        ``union``)."""
        n, m = len(sets), len(self.names)
        full_m, mod_m = np.zeros((n, m)), np.zeros((n, m))
        full = models(0)
        S = full.score_users(torch.arange(self.target.n_users, device=self.device)).detach()
        full_fn = scores_fn_from_matrix(S)
        full_pred = self.predictions(full)
        if union:
            drop = np.concatenate([np.asarray(s, np.int64) for s in sets]) if sets else np.zeros(0, np.int64)
            base_rows = ~np.isin(self.groups, drop)
        else:
            drop = np.zeros(0, np.int64)
            base_rows = np.ones(len(self.target), bool)
        fast_user = self.kind == "user" and not union
        if fast_user:
            users, F_u = self.per_user(full_fn)
        else:
            tgt0 = self.target.take(base_rows)
            F0 = self._ranking(full_fn, tgt0, drop) | self._rating(full_pred, base_rows)
        for j in range(n):
            model = full if j == 0 else models(j)
            drop_j = np.asarray(sets[j], np.int64) if self_exclude else np.zeros(0, np.int64)
            rows = base_rows & ~np.isin(self.groups, drop_j)
            pred = full_pred if j == 0 else self.predictions(model)
            fn = full_fn if j == 0 else model.score_users
            if fast_user:
                keep_u = ~np.isin(users, drop_j)
                M_u = F_u if j == 0 else self.per_user(fn)[1]
                fr = dict(zip(self.rank, F_u[keep_u].mean(0))) if len(self.rank) else {}
                mr = dict(zip(self.rank, M_u[keep_u].mean(0))) if len(self.rank) else {}
                fr |= self._rating(full_pred, rows)
                mr |= self._rating(pred, rows)
            elif len(drop_j):
                tgt = self.target.take(rows)
                removed = np.concatenate([drop, drop_j])
                fr = self._ranking(full_fn, tgt, removed) | self._rating(full_pred, rows)
                mr = self._ranking(fn, tgt, removed) | self._rating(pred, rows)
            else:
                fr = F0
                mr = F0 if j == 0 else self._ranking(fn, tgt0, drop) | self._rating(pred, rows)
            full_m[j] = [fr[k] for k in self.names]
            mod_m[j] = [mr[k] for k in self.names]
        return full_m, mod_m


# ---------------------------------------------------------------------------------------
# one work item: train a family of models (the full one first) and evaluate them
# ---------------------------------------------------------------------------------------
def resolve_engine(opts: DeletionConfig, model_kind: str) -> str:
    if opts.engine != "auto":
        return opts.engine
    if model_kind == "puresvd":
        return "closed-form"
    if model_kind in ("ncf", "svd"):
        return "batched"     # (MF-BPR has a stacked form too, slower per model on a CPU than its sparse engine)
    return "sequential"


def _train_family(shared: dict, seed: int, sets: list):
    """Models trained without each set of groups (``sets[0] = []``: the full model).
    Returns ``models(j) -> nn.Module``."""
    from ...train import build_task, fit
    opts: DeletionConfig = shared["opts"]
    train: Interactions = shared["train"]
    row_group = shared["row_group"]
    tcfg = dataclasses.replace(shared["train_cfg"], seed=int(seed),
                               epochs=int(opts.epochs or shared["train_cfg"].epochs))
    engine = shared["engine"]
    if engine == "batched":
        from .stacked import train_stacked
        task = build_task(shared["model_cfg"], train, tcfg)
        drop = torch.zeros(len(sets), shared["n_groups"], dtype=torch.bool)
        for j, s in enumerate(sets):
            drop[j, torch.as_tensor(np.asarray(s, np.int64))] = True
        stack = train_stacked(task, tcfg, drop, torch.as_tensor(row_group), seed=int(seed))
        module = task.model
        module.eval()
        return lambda j: stack.load(module, j)
    if engine == "closed-form":
        return _puresvd_family(shared, sets)
    cache = {}

    def models(j):
        if j not in cache:
            cache.clear()
            rows = ~np.isin(row_group, np.asarray(sets[j], np.int64))
            task = build_task(shared["model_cfg"], train.take(rows), tcfg)
            fit(task, tcfg, valid=None, track_losses=False)
            cache[j] = task.model
        return cache[j]
    return models


def _puresvd_family(shared: dict, sets: list):
    """PureSVD without each set of groups: SVD of the training matrix with the set's rows
    removed; every user is scored by folding in, ``P = R V`` (equal to ``U S`` for users
    that stayed)."""
    from ...models.svd import PureSVD, truncated_svd
    train: Interactions = shared["train"]
    row_group = shared["row_group"]
    rank = shared["model_cfg"].rank
    seed = int(shared["train_cfg"].seed)
    R_full = train.csr()
    R_full.data[:] = 1.0
    module = PureSVD(train.n_users, train.n_items, rank)
    module.eval()

    def models(j):
        rows = ~np.isin(row_group, np.asarray(sets[j], np.int64))
        R = train.take(rows).csr()
        R.data[:] = 1.0
        _, _, V = truncated_svd(R, module.P.shape[1], seed, shared["model_cfg"].tol)
        with torch.no_grad():
            module.P.copy_(torch.as_tensor(R_full @ V, dtype=torch.float32))
            module.Q.copy_(torch.as_tensor(V, dtype=torch.float32))
        return module
    return models


def run_work_item(shared: dict, item: dict) -> dict:
    """Train the item's family under its seed and evaluate it (Ray-free; runs on actors)."""
    torch.set_num_threads(max(1, int(shared.get("threads", 1))))
    if shared["engine"] == "batched" and shared.get("keep_freed_memory", True):
        from .stacked import keep_freed_memory
        keep_freed_memory()
    t0 = time.perf_counter()
    sets = [np.asarray(s, np.int64) for s in item["sets"]]
    models = _train_family(shared, item["seed"], sets)
    ev: _Evaluator = shared["evaluators"][item["part"]]
    full_m, mod_m = ev.evaluate(models, sets, union=item["union"], self_exclude=item["self_exclude"])
    return {"full": full_m, "model": mod_m, "seconds": np.float64(time.perf_counter() - t0)}


# ---------------------------------------------------------------------------------------
# the valuer
# ---------------------------------------------------------------------------------------
class DeletionValuer(Valuer):
    name = "deletion"

    def value(self, ctx: ValuationContext) -> Valuation:
        opts: DeletionConfig = self.options
        split = ctx.split
        train = split.train
        names = list(dict.fromkeys(opts.metrics + [opts.metric]))
        _check_metrics(names)
        grouping = Grouping.of(opts, split, ctx.dataset)
        kind, row_group, n_groups = grouping.kind, grouping.rows["train"], grouping.n_groups
        engine = resolve_engine(opts, ctx.model_cfg.kind)
        seeds = [int(ctx.train_cfg.seed) + k for k in range(max(1, opts.seeds))]
        if engine == "closed-form":
            seeds = seeds[:1]       # deterministic: more seeds would repeat the same numbers
        entities = select_entities(row_group, n_groups, opts)
        first_new = ((ctx.prior or {}).get("first_new_entity") or {}).get(kind)
        if first_new is not None:
            # recval update: only the entities the new log brought (codes from first_new on);
            # the others keep the base run's values
            present = np.flatnonzero(np.bincount(row_group[row_group >= 0], minlength=n_groups) > 0)
            entities = present[present >= int(first_new)]
            if len(entities) == 0:
                return Valuation(method=self.name, values=np.full(len(train), np.nan), entity_kind=kind,
                                 row_entity=row_group, info=DeletionInfo(entity=kind, entities_valued=0),
                                 drop_removed_items=opts.removed_items == "drop", test_entity=grouping.rows["test"])
        dev = ctx.base.task.device if ctx.base is not None else torch.device("cpu")
        infl_part = "valid" if opts.protocol == "validation" else "test"
        if infl_part == "valid" and len(split.valid) == 0:
            raise ValueError("valuation.protocol: validation needs a validation split "
                             "(split ratios with three parts), or use protocol: test-same")
        evaluators = {}
        for part, excl in (("valid", [train]), ("test", [train, split.valid])):
            tgt = getattr(split, part)
            if len(tgt):
                evaluators[part] = _Evaluator(tgt, excl, names, ctx.eval_cfg, grouping.rows[part], kind, dev,
                                              drop_removed_items=opts.removed_items == "drop")
        self._grouping = grouping
        # keys of the work items taken from the run's store / computed by this attempt (resume)
        self._work_log = {"work_items_resumed": [], "work_items_run": []}
        shared = {"opts": opts, "train": train, "row_group": row_group, "n_groups": n_groups,
                  "model_cfg": ctx.model_cfg, "train_cfg": ctx.train_cfg, "engine": engine,
                  "evaluators": evaluators, "threads": max(1, int(opts.resources.cpus)) if opts.resources.actors else
                  torch.get_num_threads()}
        if opts.values_from:
            return self._from_earlier(ctx, shared, seeds, engine, names, grouping, evaluators)
        shards = [entities[i:i + opts.shard_size] for i in range(0, len(entities), max(1, opts.shard_size))]
        items, keys = [], []
        for s in seeds:
            for k, ents in enumerate(shards):
                items.append({"seed": s, "sets": [[]] + [[int(e)] for e in ents], "part": infl_part,
                              "union": False, "self_exclude": opts.self_eval == "exclude"})
                keys.append(f"influence-seed{s}-shard{k:04d}-of{len(shards):04d}")
        results = self._run(ctx, shared, items, keys, "influence", n_models=len(entities) * len(seeds))

        # influence[s, e, m] = full - without e
        infl = np.full((len(seeds), len(entities), len(names)), np.nan)
        for idx, (s_i, k) in enumerate((si, k) for si in range(len(seeds)) for k in range(len(shards))):
            r = results[idx]
            lo = k * opts.shard_size
            infl[s_i, lo:lo + len(shards[k])] = (r["full"] - r["model"])[1:]
        sign = np.array([-1.0 if n in LOWER_IS_BETTER else 1.0 for n in names])
        vcol = names.index(opts.metric)
        per_seed_value = infl[:, :, vcol] * sign[vcol]
        value = per_seed_value.mean(0)
        se = _se(per_seed_value)

        values_row = _row_values(entities, value, n_groups, row_group)
        table = self._entity_table(grouping, entities, value, se, infl, names, train)
        info = DeletionInfo(entity=kind, id_column=grouping.id_column, engine=engine, seeds=seeds,
                            entities_valued=int(len(entities)), metric=opts.metric, metrics=names,
                            protocol=opts.protocol, influence_split=infl_part, self_eval=opts.self_eval,
                            removed_items=opts.removed_items,
                            epochs=None if engine == "closed-form" else int(opts.epochs or ctx.train_cfg.epochs),
                            shard_size=opts.shard_size, actors=opts.resources.actors, work_items=len(items),
                            train_seconds_sum=float(sum(float(r["seconds"]) for r in results)))
        info.update(stability(per_seed_value))
        tables = self._removal_tables(ctx, shared, seeds, engine, entities, value, names, kind, evaluators, info)
        info.update(self._work_log)
        return Valuation(method=self.name, values=values_row, columns={f"{kind}_value": values_row},
                         entities=table, entity_kind=kind, row_entity=row_group, tables=tables, info=info,
                         drop_removed_items=opts.removed_items == "drop",
                         value_se=_row_values(entities, se, n_groups, row_group), n_estimates=len(seeds),
                         test_entity=grouping.rows["test"])

    def _from_earlier(self, ctx, shared, seeds, engine, names, grouping, evaluators):
        """Values read from an earlier run's entity table; only the removal experiment runs."""
        import pyarrow.parquet as pq

        from ...fs import resolve
        opts: DeletionConfig = self.options
        fs, path = resolve(opts.values_from)
        tab = pq.read_table(path, filesystem=fs)
        kind, row_group, n_groups, col = grouping.kind, grouping.rows["train"], grouping.n_groups, grouping.id_column
        if col not in tab.column_names or "value" not in tab.column_names:
            raise ValueError(f"valuation.values_from: {opts.values_from} has no {col} and value columns")
        known = grouping.labels(np.arange(n_groups))
        index = {v: i for i, v in enumerate(known)}
        ids = tab.column(col).to_pylist()
        missing = [v for v in ids if v not in index]
        if missing:
            raise ValueError(f"valuation.values_from: {len(missing)} {kind} ids of {opts.values_from} are not in "
                             f"this run's data (first: {missing[0]!r})")
        order = np.argsort([index[v] for v in ids], kind="stable")
        entities = np.asarray([index[v] for v in ids], np.int64)[order]
        value = np.asarray(tab.column("value").to_numpy(zero_copy_only=False), np.float64)[order]
        values_row = _row_values(entities, value, n_groups, row_group)
        table = {c: (tab.column(c).take(order) if c == col else
                     np.asarray(tab.column(c).to_numpy(zero_copy_only=False))[order]) for c in tab.column_names}
        info = DeletionInfo(entity=kind, id_column=col, engine=engine, values_from=opts.values_from,
                            removed_items=opts.removed_items, entities_valued=int(len(entities)),
                            metric=opts.metric, metrics=names, protocol=opts.protocol)
        tables = self._removal_tables(ctx, shared, seeds, engine, entities, value, names, kind, evaluators, info)
        return Valuation(method=self.name, values=values_row, columns={f"{kind}_value": values_row},
                         entities=table, entity_kind=kind, row_entity=row_group, tables=tables, info=info,
                         drop_removed_items=opts.removed_items == "drop",
                         test_entity=grouping.rows["test"])

    # -- execution with resume -----------------------------------------------------------
    def _run(self, ctx, shared, items, keys, label, n_models) -> list:
        fp = fingerprint(ctx, self.options)
        results, log_ = run_items(run_work_item, shared, items, [f"{fp}/{k}" for k in keys], executor=ctx.executor,
                                  store=ctx.store, label=f"deletion {label}", units=n_models / max(1, len(items)),
                                  unit="models", logger=log)
        strip = len(fp) + 1
        self._work_log["work_items_resumed"] += [k[strip:] for k in log_["resumed"]]
        self._work_log["work_items_run"] += [k[strip:] for k in log_["run"]]
        return results

    # -- removal experiment --------------------------------------------------------------
    def _removal_tables(self, ctx, shared, seeds, engine, entities, value, names, kind, evaluators, info) -> dict:
        """``{"removal_experiment": long table, "removal_summary": its summary}``
        (:mod:`...removal`; empty when off or too few entities); the groups removed and the seeds
        used go into ``info``."""
        opts: DeletionConfig = self.options
        if opts.removal_n <= 0 or len(entities) < 2 * opts.removal_n or "test" not in evaluators:
            return {}
        r_seeds = seeds if opts.removal_seeds == "same" or engine == "closed-form" else \
            [int(ctx.train_cfg.seed) + len(seeds) + k for k in range(len(seeds))]
        removal, groups = self._removal(ctx, shared, r_seeds, entities, value, names)
        info["removal"] = {g: self._grouping.labels(ids) for g, ids in groups.items()}
        info["removal_seeds"] = r_seeds
        return {"removal_experiment": removal, "removal_summary": summarise_removal(removal, baseline="full")}

    def _removal(self, ctx, shared, seeds, entities, value, names):
        opts: DeletionConfig = self.options
        n = opts.removal_n
        order = np.lexsort((entities, -value))            # most influential first, ties by id
        ok = ~np.isnan(value[order])
        order = order[ok]
        most, least = entities[order[:n]], entities[order[::-1][:n]]
        rng = np.random.default_rng([opts.sample_seed, 1])
        rand = np.sort(rng.choice(entities, size=n, replace=False))
        groups = {"most_influential": np.sort(most), "least_influential": np.sort(least), "random": rand}
        sets = [[]] + [list(map(int, g)) for g in groups.values()]
        items = [{"seed": s, "sets": sets, "part": "test", "union": True, "self_exclude": False} for s in seeds]
        keys = [f"removal-seed{s}" for s in seeds]
        res = self._run(ctx, shared, items, keys, "removal", n_models=len(items) * len(sets))
        M = np.stack([r["model"] for r in res])            # [S, 4, m]
        return removal_long_table(["full"] + list(groups), seeds, names, M), groups

    # -- entity table --------------------------------------------------------------------
    def _entity_table(self, grouping, entities, value, se, infl, names, train) -> dict:
        row_group = grouping.rows["train"]
        grouped = row_group >= 0
        counts = np.bincount(row_group[grouped], minlength=grouping.n_groups)
        table = {grouping.id_column: grouping.labels(entities, arrow=True)}
        table["value"] = value
        table["value_se"] = se
        for k, n in enumerate(names):
            table[f"influence_{n}"] = infl[:, :, k].mean(0)
            table[f"se_{n}"] = _se(infl[:, :, k])
        table["n_ratings"] = counts[entities].astype(np.int64)
        if train.rating is not None:
            r = np.asarray(train.rating, np.float64)
            s1 = np.bincount(row_group[grouped], weights=r[grouped], minlength=len(counts))
            s2 = np.bincount(row_group[grouped], weights=(r * r)[grouped], minlength=len(counts))
            c = np.maximum(counts, 1)
            mean = s1 / c
            std = np.sqrt(np.maximum(s2 / c - mean ** 2, 0.0) * c / np.maximum(c - 1, 1))
            table["mean_rating"] = mean[entities]
            table["std_rating"] = std[entities]
        table["n_seeds"] = np.full(len(entities), infl.shape[0], np.int64)
        return table


def _row_values(entities: np.ndarray, value: np.ndarray, n_groups: int, row_group: np.ndarray) -> np.ndarray:
    """Each training row carries its entity's value (NaN for entities not valued and for rows
    of no group, ``-1``)."""
    ent_value = np.full(n_groups + 1, np.nan)
    ent_value[entities] = value
    return ent_value[np.where(row_group >= 0, row_group, n_groups)]


def select_entities(row_group: np.ndarray, n_groups: int, opts: DeletionConfig) -> np.ndarray:
    """Sorted indices of the entities to value (those with at least one training row)."""
    counts = np.bincount(row_group[row_group >= 0], minlength=n_groups)
    present = np.flatnonzero(counts > 0)
    n = min(int(opts.n_entities), len(present))
    if opts.entities == "all":
        return present
    if opts.entities == "sample":
        rng = np.random.default_rng(opts.sample_seed)
        return np.sort(rng.choice(present, size=n, replace=False))
    order = np.lexsort((present, -counts[present]))   # most rows first, ties by index
    return np.sort(present[order[:n]])


def stability(per_seed: np.ndarray) -> dict:
    """Spearman correlation of the entities' values between two disjoint halves of the seeds
    (first floor(S/2) vs the rest), and the mean over pairs of single seeds."""
    from scipy.stats import spearmanr
    S = per_seed.shape[0]
    if S < 2:
        return {}
    h = S // 2
    a, b = per_seed[:h].mean(0), per_seed[h:].mean(0)
    ok = np.isfinite(a) & np.isfinite(b)
    out = {"stability_spearman_halves": float(spearmanr(a[ok], b[ok]).statistic),
           "stability_halves": [list(range(h)), list(range(h, S))]}
    pairs = [float(spearmanr(per_seed[i], per_seed[j]).statistic) for i in range(S) for j in range(i + 1, S)]
    out["stability_spearman_seed_pairs_mean"] = float(np.mean(pairs))
    return out


def _se(x: np.ndarray) -> np.ndarray:
    """Standard error over axis 0 (ddof 1); NaN with a single seed (:mod:`...stats`)."""
    return standard_error(x, axis=0)


def _check_metrics(names: list) -> None:
    from ...metrics import parse_metric
    for n in names:
        if n in RATING or n in ("map", "mrr"):
            continue
        base, k = parse_metric(n)
        if k is None:
            raise ValueError(f"valuation.metrics: {n!r}: give a cut-off (e.g. {n}@10), or map / mrr "
                             "for the full ranking, or one of " + ", ".join(RATING))


def fingerprint(ctx: ValuationContext, opts: DeletionConfig) -> str:
    """What a work item's result depends on (:func:`...executor.work_fingerprint`): data, split,
    model, training, valuation settings, not the number of actors."""
    return work_fingerprint("deletion", ctx, dataclasses.asdict(opts), ignore=("resources",))


def check_job(job) -> None:
    """``protocol: validation`` measures influence on the validation split."""
    if getattr(job.valuation, "protocol", None) == "validation":
        require_validation(job, "valuation.protocol: validation (or use protocol: test-same)")


@register_valuer("deletion", DeletionConfig, entity_level=True, work_items=True, check=check_job,
                 updates="new-entities", update_options={"removal_n": 0},
                 report_sections=("recval_ray.core.valuers.deletion.report:section",))
def build_deletion(opts: DeletionConfig) -> DeletionValuer:
    if opts.seeds < 1:
        raise ValueError("valuation.seeds must be >= 1")
    if opts.shard_size < 1:
        raise ValueError("valuation.shard_size must be >= 1")
    return DeletionValuer(opts)
