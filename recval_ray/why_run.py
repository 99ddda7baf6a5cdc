"""``recval why RUN --user U --item X``: which training interactions made the run's model score
item X for user U, and would the recommendation survive without them?

The run's ``state/`` (:mod:`recval_ray.run_state`) gives the split (codes), the id maps and the
selected weights; its ``checkpoints/base/`` (``output.checkpoints: true``) the per-epoch weights
and learning rates TracInCP sums over (without them: the final weights only, said in the
output). Attribution is :mod:`recval_ray.core.attribution` (MF and NeuMF: the models with an
influence objective). Queries: ``--user/--item`` (original ids), ``--queries FILE`` (CSV or
Parquet with ``user_id`` and ``item_id``), or ``--sample-users N`` (N seeded users and their
top-1 recommendation). ``--verify`` retrains the model for the base's selected number of epochs
from the same initialisation and batch stream (common random numbers, no early stopping) without
the top-k proponents, without k random rows of the same user and without k random rows overall,
and reports the target's score and rank in each, over ``--verify-seeds`` seeds
(``--verify-engine``: :func:`verify_queries`).

Output (a new run, default ``<run>-why`` next to it): ``attributions/`` (per query, the top
proponents and opponents with original ids, titles when the run's data has them, contribution
and group: ``user`` / ``item`` / ``other``), ``queries/`` (per query: target score and rank,
shares of the positive contributions, rows computed, seconds, verification), ``pages/`` (one
small HTML page per query), ``metrics.json``, ``report.html``, ``manifest.json`` last.
"""
from __future__ import annotations

import dataclasses
import logging
import posixpath
import time
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from . import fs as rfs
from .core.attribution import MODEL_KINDS as SUPPORTED
from .errors import ConfigError, InputError

log = logging.getLogger("recval_ray")
QUERY_BATCH = 32        # TracIn queries attributed together (one shared forward pass per chunk of rows)
SCORES_BYTES = 256 << 20    # the float64 per-row scores of one group of queries held at once


def _codes(ids: pa.Array, wanted: list, what: str) -> np.ndarray:
    arr = pa.array(wanted)
    if pa.types.is_integer(ids.type):
        try:
            arr = pa.array([int(x) for x in wanted], pa.int64())
        except (TypeError, ValueError):
            raise InputError(f"--{what}: {wanted[0]!r}: the run's {what} ids are integers") from None
    else:
        arr = arr.cast(pa.string())
    codes = pc.index_in(arr, value_set=ids).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    if (codes < 0).any():
        bad = [w for w, c in zip(wanted, codes) if c < 0][:3]
        raise InputError(f"--{what}: {', '.join(map(repr, bad))}: not a {what} of the run's training data")
    return codes


def read_queries(path: str) -> list[tuple]:
    """(user_id, item_id) pairs of a CSV or Parquet file with those columns."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq
    tab = pq.read_table(path) if path.endswith(".parquet") else pcsv.read_csv(path)
    missing = [c for c in ("user_id", "item_id") if c not in tab.column_names]
    if missing:
        raise InputError(f"{path}: no {', '.join(missing)} column (a queries file holds user_id and item_id)",
                         file=path)
    return list(zip(tab["user_id"].to_pylist(), tab["item_id"].to_pylist()))


def checkpoint_weights(fs, root: str, fallback_lr: float, last_epoch: Optional[int]) -> tuple[list, str]:
    """``([(state_dict, lr), ...], note)``: the run's per-epoch checkpoints up to the selected
    epoch (``last_epoch``, 0-based; None: all), or none when the run kept none (the caller then
    uses the final weights)."""
    import io
    import torch
    base = posixpath.join(root, "checkpoints", "base")
    if not rfs.exists(fs, base):
        return [], "final weights only (the run kept no checkpoints: output.checkpoints: true keeps them)"
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(base)) if i.path.endswith(".pt"))
    out = []
    for f in files:
        epoch = int(posixpath.basename(f).split("_")[-1].split(".")[0])
        if last_epoch is not None and epoch > last_epoch:
            continue
        with fs.open_input_stream(f) as fh:
            ck = torch.load(io.BytesIO(fh.read()), map_location="cpu", weights_only=True)
        out.append((ck["model"], float(ck.get("lr", fallback_lr))))
    return out, f"TracInCP over {len(out)} checkpoints"


def flat_theta(obj, state_dict):
    """The checkpoint's weights as a flat vector in the objective's parameter order."""
    import torch
    return torch.cat([state_dict[n].reshape(-1).to(obj.theta.dtype) for n in obj.names]).to(obj.theta.device)


VERIFY_ENGINES = ("auto", "run", "sparse", "stacked")
#: the removals ``--verify`` can retrain without (``--verify-variants``, default all)
VERIFY_VARIANTS = ("top_proponents", "random_user_rows", "random_rows")
STACK_BYTES = 1 << 30       # a verification stack's tables and optimiser state (models per stack follow)


def verify_train_config(cfg, engine: str, seed: int, epochs: int):
    """The training settings of a verification retraining: the run's, for ``epochs`` epochs of
    seed ``seed`` without early stopping; ``engine: sparse`` (``auto`` on MF where the run's
    settings allow it) trains MF with its row-sparse engine (lazy Adam): 10x faster here than
    autograd with dense Adam, and every variant of a query is trained alike."""
    from .core.fast_bpr import check_engine
    tcfg = dataclasses.replace(cfg.train, seed=int(seed), epochs=int(epochs), patience=10 ** 6)
    if engine in ("sparse", "auto") and cfg.model.kind == "mf" and tcfg.engine != "sparse":
        fast = dataclasses.replace(tcfg, engine="sparse", workers=0)
        try:
            check_engine(fast, "mf")
            return fast
        except ConfigError:
            if engine == "sparse":
                raise
    elif engine == "sparse" and tcfg.engine != "sparse":
        raise ConfigError(f"--verify-engine sparse trains MF only; the run's model is {cfg.model.kind}")
    return tcfg


def verify_variants(cfg, train, user: int, item: int, proponents: np.ndarray, k: int, s: int,
                    names: tuple = VERIFY_VARIANTS) -> dict:
    """The rows each retraining of seed ``s`` leaves out: none, the top-k proponents, k seeded
    random rows of the user, k seeded random rows; only the variants in ``names`` (besides
    ``none``). The random draws do not depend on which variants are asked for."""
    own = np.flatnonzero(train.user == user)
    rng = np.random.default_rng([int(cfg.train.seed), 0x3A1, int(user), int(item), s])
    every = {"none": np.zeros(0, np.int64), "top_proponents": np.asarray(proponents[:k], np.int64),
             "random_user_rows": rng.choice(own, min(k, len(own)), replace=False),
             "random_rows": rng.choice(len(train), k, replace=False)}
    return {name: rows for name, rows in every.items() if name == "none" or name in names}


def check_variants(names) -> tuple:
    """``--verify-variants``: a non-empty subset of :data:`VERIFY_VARIANTS`, in their order."""
    names = [names] if isinstance(names, str) else list(names)
    names = [n.strip() for part in names for n in str(part).split(",") if n.strip()]
    bad = [n for n in names if n not in VERIFY_VARIANTS]
    if bad or not names:
        raise ConfigError(f"--verify-variants {','.join(names) or '(none)'}: a comma-separated list of "
                          f"{', '.join(VERIFY_VARIANTS)}")
    return tuple(n for n in VERIFY_VARIANTS if n in names)


def _score_and_rank(model, train, user: int, item: int, own_items: Optional[np.ndarray] = None
                    ) -> tuple[float, int]:
    """The score of ``item`` for ``user`` and its rank among the items outside the user's
    training rows (``own_items``: those items, when the caller has them)."""
    import torch
    from .core.attribution import rank_of
    with torch.no_grad():
        scores = model.score_users(torch.tensor([user]))[0].cpu().numpy()
    if own_items is None:
        own_items = train.item[train.user == user]
    return float(scores[item]), rank_of(scores, item, own_items)


def retrain_without(cfg, split, models: list, queries: list, seed_offset: int, epochs: int,
                    engine: str = "auto", progress=None) -> dict:
    """``{(query, name): (score, rank)}``: the target of each query in models trained from the
    same initialisation and batches (common random numbers, training seed ``train.seed +
    seed_offset``, ``epochs`` epochs) without rows. ``models``: ``(query, name, rows)``; the
    first is the reference (no rows, ``query`` None: scored for every query). ``engine:
    stacked`` trains them together in stacks (:func:`~.core.valuers.deletion.stacked.
    train_stacked`, each stack with its own copy of the reference; tested equal to the sparse
    engine for MF); otherwise one ``fit(drop_rows=...)`` per model (:func:`verify_train_config`)."""
    import copy

    import torch
    from .core.train import build_task, fit
    from .core.valuers.deletion.stacked import train_stacked
    train = split.train
    n = len(train)
    s = int(seed_offset)
    tcfg = verify_train_config(cfg, "run" if engine == "stacked" else engine, int(cfg.train.seed) + s, epochs)
    results: dict = {}
    own = [train.item[train.user == qr[0]] for qr in queries]     # each query user's items, once

    def score(module, q, name):
        for qq in ([q] if q is not None else range(len(queries))):
            results[(qq, name)] = _score_and_rank(module, train, queries[qq][0], queries[qq][1], own[qq])
    if engine == "stacked":
        per_model = 12 * (train.n_users + train.n_items) * int(getattr(cfg.model, "dim", 64)) + 1
        size = int(max(4, min(256, STACK_BYTES // per_model)))
        for a in range(1, max(2, len(models)), size - 1):
            part = [models[0]] + models[a:a + size - 1]
            # a group per row some model of the stack removes; every other row is in none (-1):
            # the drop matrix is [models, removed rows], not [models, training rows]
            removed = np.unique(np.concatenate([np.asarray(rows, np.int64) for _, _, rows in part]))
            row_group = torch.full((n,), -1, dtype=torch.long)
            row_group[torch.as_tensor(removed)] = torch.arange(len(removed))
            drop = torch.zeros(len(part), len(removed), dtype=torch.bool)
            for b, (_, _, rows) in enumerate(part):
                drop[b, torch.as_tensor(np.searchsorted(removed, rows), dtype=torch.long)] = True
            task = build_task(cfg.model, train, tcfg)
            stack = train_stacked(task, tcfg, drop, row_group, seed=tcfg.seed)
            module = copy.deepcopy(task.model).eval()
            for b, (q, name, _) in enumerate(part):
                score(stack.load(module, b), q, name)
            if progress is not None:
                progress(s, min(a + size - 1, len(models)), len(models))
        return results
    for m, (q, name, rows) in enumerate(models):
        drop = torch.zeros(n, dtype=torch.bool)
        drop[torch.as_tensor(rows, dtype=torch.long)] = True
        task = build_task(cfg.model, train, tcfg)
        fit(task, tcfg, valid=None, track_losses=False, drop_rows=drop if len(rows) else None)
        score(task.model.eval(), q, name)
        if progress is not None:
            progress(s, m + 1, len(models))
    return results


def verify_queries(cfg, split, queries: list, k: int, seeds: int, epochs: int, engine: str = "auto",
                   progress=None, variants: tuple = VERIFY_VARIANTS) -> list[list[dict]]:
    """Per query ``(user, item, proponents)``, its verification retrainings: ``{"seed",
    "variant", "removed", "score", "rank"}`` of the target in a model retrained without each
    variant's rows (:func:`verify_variants`, :func:`retrain_without`); the reference (nothing
    removed) is trained once per seed and shared by the queries."""
    out: list = [[] for _ in queries]
    for s in range(seeds):
        removals = [verify_variants(cfg, split.train, u, x, pro, k, s, variants) for u, x, pro in queries]
        models = [(None, "none", np.zeros(0, np.int64))] + [
            (q, name, rows) for q, v in enumerate(removals) for name, rows in v.items() if name != "none"]
        results = retrain_without(cfg, split, models, queries, s, epochs, engine, progress)
        for q, v in enumerate(removals):
            for name, rows in v.items():
                score, rank = results[(q, name)]
                out[q].append({"seed": s, "variant": name, "removed": int(len(rows)), "score": score,
                               "rank": rank})
    return out


def deletion_candidates(train, user: int, item: int, per_group: int, seed: int) -> np.ndarray:
    """The rows ``--method deletion`` retrains without, one at a time: the user's own rows and
    the item's rows (the rows whose gradient reaches the score directly in an embedding model),
    at most ``per_group`` of each, a seeded sample when there are more; sorted."""
    rng = np.random.default_rng([int(seed), 0xDE1, int(user), int(item)])
    own = np.flatnonzero(train.user == user)
    its = np.flatnonzero((train.item == item) & (train.user != user))
    pick = [g if len(g) <= per_group else rng.choice(g, per_group, replace=False) for g in (own, its)]
    return np.sort(np.concatenate(pick)).astype(np.int64)


def deletion_attributions(cfg, split, pairs: list, *, per_group: int, seeds: int, epochs: int, top: int,
                          engine: str = "auto", seed: int = 0, progress=None) -> list:
    """``recval why --method deletion``: for each query, every candidate row
    (:func:`deletion_candidates`) removed alone and the model retrained (common random numbers,
    :func:`retrain_without`); a row's contribution is the target's score in the reference minus
    its score without the row, averaged over ``seeds`` training seeds (positive: the row holds
    the score up). Exact leave-one-out on the candidates, no approximation; rows outside the
    candidates are not computed (0). Compact results as :func:`attribute_group`'s."""
    from .core.attribution import Attribution
    train = split.train
    t0 = time.perf_counter()
    cands = [deletion_candidates(train, u, x, per_group, seed) for u, x in pairs]
    models = [(None, "none", np.zeros(0, np.int64))] + [
        (q, int(r), np.array([r])) for q, c in enumerate(cands) for r in c]
    drop = [np.zeros(len(c)) for c in cands]
    for s in range(seeds):
        res = retrain_without(cfg, split, models, pairs, s, epochs, engine, progress)
        for q, c in enumerate(cands):
            ref = res[(q, "none")][0]
            drop[q] += np.array([ref - res[(q, int(r))][0] for r in c]) / seeds
    seconds = (time.perf_counter() - t0) / max(1, len(pairs))
    out = []
    for (u, x), c, d in zip(pairs, cands, drop):
        scores = np.zeros(len(train))
        scores[c] = d
        out.append(compact(Attribution(int(u), int(x), scores, float("nan"), "deletion", int(len(c))),
                           train, top, seconds))
    return out


def compact(att, train, top: int, seconds: float) -> dict:
    """What ``recval why`` keeps of a query's attribution: the top proponents and opponents and
    their contributions, the shares of the positive contribution, the rows computed, seconds."""
    pro, opp = att.top(top, 1), att.top(top, -1)
    rows = np.concatenate([pro, opp])
    return {"proponents": pro, "opponents": opp, "rows_computed": int(att.rows_computed),
            "contribution": dict(zip(rows.tolist(), att.scores[rows].tolist())),
            "shares": att.shares(train.user, train.item), "seconds": seconds}


def build_objective(model_cfg, train_cfg, train, valid, weights: dict):
    """``(task, objective)``: the run's model with its selected ``weights`` and its attribution
    objective."""
    from .core.influence import model_objective
    from .core.train import build_task
    task = build_task(model_cfg, train, train_cfg)
    task.model.load_state_dict(weights)
    task.model.eval()
    return task, model_objective(task, train, valid, seed=int(train_cfg.seed))


def checkpoint_objectives(obj, checkpoints: list, lr: float) -> list:
    """``[(objective, theta, lr)]`` per checkpoint; the selected weights alone without any."""
    return [(obj, flat_theta(obj, sd), c_lr) for sd, c_lr in checkpoints] or [(obj, obj.theta, float(lr))]


def attribute_group(shared: dict, pairs: list) -> list:
    """Work item of ``recval why``: the attributions of a group of ``(user, item)`` codes,
    compact (top proponents and opponents with their contributions, the shares, rows computed,
    seconds per query). ``shared["built"]``: the objective and checkpoint objectives, else built
    here once per process (a Ray actor) from the run's rows and weights."""
    from .core.attribution import influence, tracin_many
    if shared.get("built") is None:
        _, obj = build_objective(shared["model"], shared["train_cfg"], shared["train"], shared["valid"],
                                 shared["weights"])
        shared["built"] = (obj, checkpoint_objectives(obj, shared["checkpoints"], shared["train_cfg"].lr))
    obj, objectives = shared["built"]
    train, top = shared["train"], int(shared["top"])
    t0 = time.perf_counter()
    if shared["method"] == "tracin":
        atts = tracin_many(objectives, pairs)
    else:
        atts = [influence(obj, obj.theta, u, x, damping=shared["damping"], tol=1e-6, max_iter=300)
                for u, x in pairs]
    seconds = (time.perf_counter() - t0) / max(1, len(pairs))
    return [compact(att, train, top, seconds) for att in atts]


def why_run(run_uri: str, queries: Optional[list] = None, *, queries_file: Optional[str] = None,
            sample_users: int = 0, sample_seed: int = 0, top: int = 20, method: str = "tracin",
            verify: bool = False, k: int = 10, verify_seeds: int = 1, damping: Optional[float] = None,
            output_uri: Optional[str] = None, run_id: Optional[str] = None, overwrite: bool = False,
            actors: int = 0, address: Optional[str] = None, verify_engine: str = "auto",
            deletion_rows: int = 20, deletion_seeds: int = 1, verify_variants: tuple = VERIFY_VARIANTS) -> dict:
    """Attribute the run's scores of the queries to its training rows; returns the new output's
    manifest with ``summary`` (per query) added. ``actors`` > 0: the groups of queries are
    attributed on that many Ray actors (the run's rows and weights shared once through the
    object store), the same numbers as in this process."""
    import torch
    from .config import validate_config
    from .core.attribution import rank_of
    from .check_run import _base_epochs
    from .explain_run import open_beside
    from .output import read_manifest
    from .report import Report
    from .run_state import read_state

    t_all = time.perf_counter()
    fs, root = rfs.resolve(run_uri)
    manifest = read_manifest(fs, posixpath.join(root, "manifest.json"))
    if manifest is None or not isinstance(manifest.get("config"), dict):
        raise ConfigError(f"{run_uri}: not a complete run (no complete manifest.json)")
    cfg = validate_config(manifest["config"])
    if cfg.model.kind not in SUPPORTED:
        raise ConfigError(f"recval why supports model.kind {', '.join(SUPPORTED)} (the models with an influence "
                          f"objective); the run's model is {cfg.model.kind}")
    if method not in ("tracin", "influence", "deletion"):
        raise ConfigError(f"--method {method}: tracin, influence or deletion")
    if verify_engine not in VERIFY_ENGINES:
        raise ConfigError(f"--verify-engine {verify_engine}: one of {', '.join(VERIFY_ENGINES)}")
    variants = check_variants(verify_variants)
    state = read_state(fs, root, run_uri)
    split = state.split
    train = split.train

    task, obj = build_objective(cfg.model, cfg.train, train, split.valid, state.model)

    csr = train.csr()
    pairs: list = []
    if queries:
        pairs += list(queries)
    if queries_file:
        pairs += read_queries(queries_file)
    users = _codes(state.user_ids, [p[0] for p in pairs], "user") if pairs else np.zeros(0, np.int64)
    items = _codes(state.item_ids, [p[1] for p in pairs], "item") if pairs else np.zeros(0, np.int64)
    if sample_users:
        rng = np.random.default_rng([int(sample_seed), 0x5A])
        active = np.unique(train.user)
        su = np.sort(rng.choice(active, min(int(sample_users), len(active)), replace=False))
        with torch.no_grad():
            sc = task.model.score_users(torch.as_tensor(su)).cpu().numpy()
        for r, u in enumerate(su):
            sc[r, csr.indices[csr.indptr[u]:csr.indptr[u + 1]]] = -np.inf
        users = np.concatenate([users, su])
        items = np.concatenate([items, sc.argmax(1)])
    if len(users) == 0:
        raise ConfigError("recval why: no query (give --user and --item, --queries FILE or --sample-users N)")

    damp = float(damping if damping is not None else getattr(cfg.valuation, "damping", 0.01))
    base_epochs = _base_epochs(fs, root)       # the base model's selected epoch count (metrics.json)
    ckpts, note = checkpoint_weights(fs, root, float(cfg.train.lr), base_epochs - 1 if base_epochs else None) \
        if method == "tracin" else ([], f"influence at the selected model, damping {damp:g}")
    objectives = checkpoint_objectives(obj, ckpts, cfg.train.lr)
    base_epochs = base_epochs or int(cfg.train.epochs)
    if method == "deletion":
        note = (f"leave-one-out retraining ({base_epochs} epochs, common random numbers, "
                f"{deletion_seeds} seed(s), --verify-engine {verify_engine}) of up to {deletion_rows} of the "
                f"user's rows and {deletion_rows} of the item's rows; other rows not computed")

    source_id, out = open_beside(run_uri, manifest, root, "why", cfg, output_uri, run_id, overwrite)
    with out:
        ds = _dataset_for_ids(state)
        rows_att, summary, to_verify = [], [], []
        def attributions():
            """``(query, user, item, compact attribution)`` in query order: groups of queries
            (:data:`QUERY_BATCH` for TracIn, bounded by :data:`SCORES_BYTES`; one for influence) by :func:`attribute_group`, in
            this process or on Ray actors; results are placed by group, not arrival."""
            pairs = list(zip(users.tolist(), items.tolist()))
            if method == "deletion":
                def progress(seed, done, total):
                    log.info("deletion: seed %d, %d/%d models retrained", seed, done, total)
                yield from ((q, u, x, att) for q, ((u, x), att) in enumerate(zip(pairs, deletion_attributions(
                    cfg, split, pairs, per_group=int(deletion_rows), seeds=int(deletion_seeds), epochs=base_epochs,
                    top=int(top), engine=verify_engine, seed=int(sample_seed), progress=progress))))
                return
            # TracIn: up to QUERY_BATCH queries, fewer when their per-row scores (8 B per row
            # each) would pass SCORES_BYTES; influence: one CG solve per query
            size = max(1, min(QUERY_BATCH, SCORES_BYTES // (8 * max(1, len(train))))) if method == "tracin" else 1
            groups = [pairs[a:a + size] for a in range(0, len(pairs), size)]
            shared = {"model": cfg.model, "train_cfg": cfg.train, "train": train, "valid": split.valid,
                      "weights": state.model, "checkpoints": ckpts, "method": method, "damping": damp,
                      "top": int(top), "built": (obj, objectives)}
            done: dict = {}
            if actors and actors > 0:
                from .ray_layer.actors import ActorPoolExecutor
                from .ray_layer.session import ensure_ray
                ensure_ray(cfg.ray, address)
                remote = dict(shared, built=None)          # each actor builds its own objective
                ActorPoolExecutor(int(actors)).map(attribute_group, remote, groups,
                                                   lambda i, r: done.__setitem__(i, r))
            for g, part in enumerate(groups):
                results = done[g] if g in done else attribute_group(shared, part)
                for j, ((u, x), att) in enumerate(zip(part, results)):
                    yield g * size + j, u, x, att

        for q, u, x, att in attributions():
            t0 = time.perf_counter() - att["seconds"]
            with torch.no_grad():
                scores = task.model.score_users(torch.tensor([u]))[0].cpu().numpy()
            own_items = csr.indices[csr.indptr[u]:csr.indptr[u + 1]]
            rank = rank_of(scores, x, own_items)
            pro, opp = att["proponents"], att["opponents"]
            shares = att["shares"]
            seconds = time.perf_counter() - t0
            rec = {"query": q, "user_id": ds.user_ids[u].as_py(), "item_id": ds.item_ids[x].as_py(),
                   "title": _title(ds, x),
                   "score": float(scores[x]), "rank": rank, "in_training": bool(np.isin(x, own_items)), "method": method, "rows_computed": att["rows_computed"],
                   "seconds": seconds, **{f"share_{k_}": v for k_, v in shares.items()},
                   "proponents": int(len(pro)), "opponents": int(len(opp))}
            summary.append(rec)
            to_verify.append((u, x, pro))
            for role, idx in (("proponent", pro), ("opponent", opp)):
                for r_, row in enumerate(idx):
                    ru, ri = int(train.user[row]), int(train.item[row])
                    rows_att.append({"query": q, "query_user_id": rec["user_id"], "query_item_id": rec["item_id"],
                                     "role": role, "rank": r_ + 1, "row": int(row),
                                     "user_id": ds.user_ids[ru].as_py(), "item_id": ds.item_ids[ri].as_py(),
                                     "title": _title(ds, ri),
                                     "contribution": float(att["contribution"][int(row)]),
                                     "group": "user" if ru == u else ("item" if ri == x else "other")})
            log.info("why %d/%d: user %s item %s (rank %d, score %.3f): %d proponents, user rows %.0f%% of the "
                     "positive contribution, %.2f s", q + 1, len(users), rec["user_id"], rec["item_id"], rank,
                     rec["score"], len(pro), 100 * shares["user_rows"], seconds)
        if verify:
            t_v = time.perf_counter()

            def progress(seed, done, total):
                log.info("verify: seed %d, %d/%d models retrained (%.0f s)", seed, done, total,
                         time.perf_counter() - t_v)
            checked = verify_queries(cfg, split, to_verify, k, verify_seeds, base_epochs, verify_engine, progress,
                                     variants)
            for rec, checks in zip(summary, checked):
                rec["verify"] = checks
                ref = {c["seed"]: c for c in checks if c["variant"] == "none"}
                for name in variants:
                    drops = [c["rank"] - ref[c["seed"]]["rank"] for c in checks if c["variant"] == name]
                    rec[f"rank_drop_{name}"] = float(np.mean(drops))
                    rec[f"score_drop_{name}"] = float(np.mean([ref[c["seed"]]["score"] - c["score"]
                                                               for c in checks if c["variant"] == name]))
            verify_seconds = time.perf_counter() - t_v
        rows_q = [{k_: v for k_, v in rec.items() if k_ != "verify"} for rec in summary]
        att_tab = pa.Table.from_pylist(rows_att) if rows_att else pa.table({"query": pa.array([], pa.int64())})
        out.write_table("attributions", att_tab, use_ray=False)
        out.write_table("queries", pa.Table.from_pylist(rows_q), use_ray=False)
        metrics = {"source_run": run_uri, "method": method, "note": note, "queries": summary,
                   "top": top, "k": k, "verify_seeds": verify_seeds if verify else 0,
                   "verify_variants": list(variants) if verify else [],
                   "verify_epochs": base_epochs if verify else None}
        if verify:
            metrics["verify_summary"] = verify_summary(summary)
            trained = "stacked" if verify_engine == "stacked" else \
                verify_train_config(cfg, verify_engine, cfg.train.seed, base_epochs).engine
            metrics["verify_engine"] = {"asked": verify_engine, "trained_with": trained,
                                        "optimizer": cfg.train.optimizer, "seconds": round(verify_seconds, 1)}
        out.write_json("metrics.json", metrics)
        for rec in summary:
            page = Report(f"why user {rec['user_id']} got item {rec['item_id']}",
                          f"{method} over the training rows of {source_id}; {note}")
            _query_section(page, rec, [r for r in rows_att if r["query"] == rec["query"]])
            out.write_text(f"pages/q{rec['query']:04d}.html", page.html())
        rep = Report(f"recval why {source_id}", f"{len(summary)} queries, {method}; {note}")
        if verify:
            rep.heading("Verification by retraining")
            rep.table([{"variant": k_, **v} for k_, v in metrics["verify_summary"].items()])
        rep.heading("Queries")
        rep.table(rows_q)
        for rec in summary[:20]:
            _query_section(rep, rec, [r for r in rows_att if r["query"] == rec["query"]])
        out.write_text("report.html", rep.html())
        result = out.complete(kind="why", config=cfg.to_dict(), source_run=run_uri,
                              timings={"total_s": time.perf_counter() - t_all})
    result["summary"] = summary
    result["verify_summary"] = metrics.get("verify_summary")
    return result


def verify_summary(summary: list) -> dict:
    """Mean and SE over queries (each the mean over its seeds) of the target's rank drop (rank
    without - rank with; positive: it fell) and score drop after each removal."""
    def mean_se(v):
        v = np.asarray(v, np.float64)
        return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    out = {}
    for name in VERIFY_VARIANTS:
        ranks = [r[f"rank_drop_{name}"] for r in summary if f"rank_drop_{name}" in r]
        if ranks:
            scores = [r[f"score_drop_{name}"] for r in summary if f"score_drop_{name}" in r]
            (mr, sr), (ms, ss) = mean_se(ranks), mean_se(scores)
            out[name] = {"mean_rank_drop": mr, "se": sr, "mean_score_drop": ms, "score_se": ss,
                         "queries": len(ranks)}
    return out


def _dataset_for_ids(state):
    from types import SimpleNamespace
    return SimpleNamespace(user_ids=state.user_ids, item_ids=state.item_ids, item_titles=state.item_titles)


def _title(ds, item: int):
    return ds.item_titles[item].as_py() if ds.item_titles is not None else None


def _query_section(rep, rec: dict, rows: list) -> None:
    named = f" ({rec['title']})" if rec.get("title") else ""
    rep.heading(f"User {rec['user_id']}, item {rec['item_id']}{named}: rank {rec['rank']}, score {rec['score']:.3f}")
    rep.paragraph(f"Positive contribution from the user's own rows {rec['share_user_rows']:.0%}, from the item's "
                  f"rows {rec['share_item_rows']:.0%}, from the rest {rec['share_other_rows']:.0%} "
                  f"({rec['rows_computed']} rows computed, {rec['seconds']:.2f} s).")
    for role in ("proponent", "opponent"):
        part = [{k: r[k] for k in ("rank", "user_id", "item_id", "title", "contribution", "group")
                 if k != "title" or r.get("title") is not None}
                for r in rows if r["role"] == role][:10]
        if part:
            rep.table(part)
