"""``recval update JOB --base RUN``: value newly arrived interactions against an earlier run.

The job's ``data`` section is the new log (any supported format, the same fields as the base
run's data); everything else comes from the base run: its config (``manifest.json``), and its
``state/`` (:mod:`recval_ray.run_state`: id maps, split as codes, values, selected weights and
the method's saved state). The job file may also hold ``name``, ``output``, ``storage``, ``ray``
and ``update``; any other key it sets must equal the base run's.

Stages: ingest the new log -> add its unseen users and items to the id maps (new codes after the
base's) -> set aside new rows whose (user, item) pair the base run already holds (in train,
validation or test) -> append the rest to the training rows (validation and test stay the base
run's) -> ``update.mode: warm``: the base weights grown for the new entities (their rows start
from the model's seeded initialisation) and fine-tuned ``update.epochs`` epochs on old + new
rows, or ``full``: trained from scratch -> the method's own pass (registry meta ``updates``)
values every row, new and old, from the fine-tuned model, reusing the base run's saved state
(influence: CG starts from the base solve, zero for new entities) -> prune the whole current log
-> write ``values/`` (``is_new``, ``valued_by``), ``pruned/``, ``keep/``, ``drop/``,
``splits/``, ``state/``, ``metrics.json``, ``report.html`` and ``manifest.json`` last, which
names the base run and the lineage back to the first full run.

The pruned model is not retrained here (that is a full training: ``recval run`` on ``pruned/``).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import posixpath
import time
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import fs as rfs
from .errors import ConfigError, InputError

log = logging.getLogger("recval_ray")

# the sections an update job sets itself; every other key continues the base run
OWN_SECTIONS = ("name", "data", "output", "storage", "ray", "update")
COLD_START_RULE = ("new users and items get new codes after the base run's; their embedding rows (and any "
                   "other per-entity weights) start from the model's seeded initialisation, are trained by the "
                   "fine-tune on their rows, and their rows are valued like every other row; influence starts "
                   "its solve at zero for them")


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            yield from _leaves(v, key)
        else:
            yield key, v


def _get(d: dict, dotted: str):
    node = d
    for p in dotted.split("."):
        if not isinstance(node, dict) or p not in node:
            return KeyError
        node = node[p]
    return node


def update_config(job_path: str, base_raw: dict, base_uri: str, overrides: list[str]):
    """The update's JobConfig: the base run's recorded config with the job file's own sections
    (:data:`OWN_SECTIONS`) and ``--set`` overrides; a key of another section that differs from
    the base run's is a ConfigError. Valuation covers the training rows (no cross-fitting), and
    nothing is retrained, verdicted, checked or explained in an update."""
    import yaml
    from .config import apply_override, expand_env, validate_config, yaml_load
    try:
        with open(job_path, "r", encoding="utf-8") as fh:
            job = yaml_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"job file {job_path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"job file {job_path} is not valid YAML: {e}") from None
    if not isinstance(job, dict):
        raise ConfigError(f"job file {job_path} must hold a mapping at its top level")
    job = expand_env(job)
    raw = copy.deepcopy(base_raw)
    for key, value in job.items():
        if key in OWN_SECTIONS:
            raw[key] = value
            continue
        for leaf, v in _leaves({key: value}) if isinstance(value, dict) else [(key, value)]:
            have = _get(base_raw, leaf)
            if have is KeyError or have != v:
                raise ConfigError(f"{job_path}: {leaf}: {v!r} differs from the base run {base_uri} "
                                  f"({'unset' if have is KeyError else repr(have)}); an update continues its base "
                                  f"run's settings: leave {key} out of the update job (it may set "
                                  f"{', '.join(OWN_SECTIONS)})")
    if "name" not in job:
        raw["name"] = f"{base_raw.get('name', 'run')}-update"
    if "output" not in job:       # next to the base run (never the base run's own run id)
        trimmed = base_uri.rstrip("/")
        raw["output"] = {"uri": trimmed.rsplit("/", 1)[0] if "/" in trimmed else "."}
    val = raw.setdefault("valuation", {})
    if "coverage" in val:
        val["coverage"] = "train"
    val.pop("checks", None)
    from .registry import VALUERS
    method = val.get("method")
    if method in VALUERS.names():    # the method's work that is a run of its own, not an update's
        for key, v in (VALUERS.meta(method).get("update_options") or {}).items():
            val[key] = v
    raw.setdefault("prune", {})["retrain"] = False
    raw["prune"]["random_control"] = False
    raw["verdict"] = dict(raw.get("verdict") or {}, enabled=False)
    raw["explain"] = dict(raw.get("explain") or {}, enabled=False)
    raw.setdefault("output", {})["checkpoints"] = False
    for o in overrides:
        apply_override(raw, o)
    return validate_config(raw)


def _check_schema(state, dataset, source: str) -> None:
    """The new log holds the base run's fields (rating, timestamp): else an InputError naming the
    new log and the field."""
    have = [f for f in ("rating", "timestamp") if getattr(dataset.interactions, f) is not None]
    want = list(state.info.get("fields") or [])
    if have != want:
        missing = [f for f in want if f not in have]
        extra = [f for f in have if f not in want]
        raise InputError(f"{source}: its columns do not match the base run's data: "
                         + "; ".join(([f"no {', '.join(missing)} (the base run's data had it)"] if missing else [])
                                     + ([f"a {', '.join(extra)} column the base run's data did not have"]
                                        if extra else []))
                         + ": an update reads new rows of the same data")


def grown_split(state, dataset, users_codes, items_codes, n_users: int, n_items: int):
    """``(split over the grown index spaces, new rows kept, counts of rows set aside)``: the base
    train then the new rows whose pair the base run does not already hold."""
    from .core.data import Interactions, Split
    from .core.update import in_sorted, known_pairs
    new = dataset.interactions
    user = users_codes[new.user]
    item = items_codes[new.item]
    base = state.split

    def grow(p: Interactions) -> Interactions:
        return Interactions(p.user, p.item, n_users, n_items, rating=p.rating, timestamp=p.timestamp,
                            is_noise=p.is_noise)
    train, valid, test = grow(base.train), grow(base.valid), grow(base.test)
    key = user.astype(np.int64) * np.int64(n_items) + item.astype(np.int64)
    in_train = in_sorted(key, known_pairs([train], n_items))
    held = in_sorted(key, known_pairs([valid, test], n_items))
    keep = ~(in_train | held)
    fresh = Interactions(user[keep], item[keep], n_users, n_items,
                         rating=new.rating[keep] if new.rating is not None else None,
                         timestamp=new.timestamp[keep] if new.timestamp is not None else None,
                         is_noise=np.zeros(int(keep.sum()), bool) if train.is_noise is not None else None)
    return Split(train.concat(fresh) if len(fresh) else train, valid, test), fresh, {
        "repeats_base_training_pair": int(in_train.sum()), "repeats_base_held_out_pair": int((held & ~in_train).sum())}


def carry_entity_values(valuation, state, valued_by: np.ndarray) -> tuple[np.ndarray, int]:
    """An entity-level update (``updates="new-entities"``) valued only the new entities: every
    other row takes its entity's value from the base run (and the run that produced it).
    Returns ``(valued_by, rows valued by this update)``."""
    ent = np.asarray(valuation.row_entity, np.int64)
    n_base = len(state.values)
    n_ent = int(ent.max()) + 2 if len(ent) else 1
    base_value = np.full(n_ent, np.nan)
    base_by = np.full(n_ent, None, dtype=object)
    old = ent[:n_base]
    ok = old >= 0
    base_value[old[ok]] = state.values[ok]
    base_by[old[ok]] = state.valued_by[ok]
    fresh = np.isfinite(valuation.values)
    idx = np.where(ent >= 0, ent, n_ent - 1)
    values = np.where(fresh, valuation.values, base_value[idx])
    by = np.where(fresh, valued_by, base_by[idx])
    valuation.values = values
    for k in list(valuation.columns):
        if k.endswith("_value"):
            valuation.columns[k] = values
    return by, int(fresh.sum())


def grown_titles(state, dataset, item_ids: pa.Array):
    """Titles of the grown item map: the base run's, then the new log's for new items (null
    where unknown); None when neither has titles."""
    new_titles = getattr(dataset, "item_titles", None)
    if state.item_titles is None and new_titles is None:
        return None
    n_base = len(state.item_ids)
    base = state.item_titles if state.item_titles is not None else pa.nulls(n_base, pa.string())
    fresh = item_ids.slice(n_base)
    if new_titles is not None and len(fresh):
        pos = pc.index_in(fresh, value_set=dataset.item_ids)
        extra = new_titles.take(pos)
    else:
        extra = pa.nulls(len(fresh), base.type)
    return pa.concat_arrays([base, extra.cast(base.type)])


def read_new_log(cfg, state, use_ray: bool):
    """The new log's Dataset; an input without a single row (a quiet day's partition) is no new
    rows, over the base run's fields and id types."""
    from .core.data import Dataset, Interactions
    from .core.errors import EmptyInputError
    from .pipeline import load_data
    try:
        return load_data(cfg, use_ray=use_ray)
    except EmptyInputError:
        fields = set(state.info.get("fields") or [])
        e = np.zeros(0, np.int64)
        rows = Interactions(e, e, 0, 0, rating=np.zeros(0, np.float32) if "rating" in fields else None,
                            timestamp=e if "timestamp" in fields else None)
        return Dataset(interactions=rows, user_ids=pa.array([], state.user_ids.type),
                       item_ids=pa.array([], state.item_ids.type))


def warm_task(cfg, split, state, train_cfg):
    """The task of ``model.kind`` on the grown training rows with the base run's weights copied
    into the leading block of every tensor (:func:`~.core.update.grow_state`)."""
    from .core.train import build_task
    from .core.update import grow_state
    task = build_task(cfg.model, split.train, train_cfg)
    fresh = task.model.state_dict()
    try:
        grown, names = grow_state(state.model, fresh)
    except ValueError as e:
        raise ConfigError(f"the base run's weights do not fit model.kind {cfg.model.kind}: {e}") from None
    task.model.load_state_dict(grown)
    return task, names


def update_run(job_path: str, base_uri: str, overrides: Optional[list[str]] = None, *,
               output_uri: Optional[str] = None, run_id: Optional[str] = None, overwrite: bool = False,
               use_ray: bool = True) -> dict:
    """Value the new log of ``job_path`` against the run at ``base_uri``; returns the new run's
    manifest with ``metrics`` and ``headline`` added."""
    from .core.evaluation import evaluate_ranking
    from .core.train import TrainResult, fit
    from .core.update import extend_ids, lineage_of, update_seed
    from .core.valuers.base import Valuation, ValuationContext
    from .core.data import Dataset
    from .output import RunOutput, read_manifest
    from .pipeline import PruneOutcome, prune_masks, train as train_from_scratch, write_outputs, \
        values_table
    from .profile import Profiler
    from .registry import VALUERS
    from .run_state import read_state, write_state

    t_all = time.perf_counter()
    fs, root = rfs.resolve(base_uri)
    base_manifest = read_manifest(fs, posixpath.join(root, "manifest.json"))
    if base_manifest is None:
        raise ConfigError(f"{base_uri}: not a complete run (no complete manifest.json); update from a finished "
                          f"`recval run` or `recval update`")
    if not isinstance(base_manifest.get("config"), dict):
        raise ConfigError(f"{base_uri}/manifest.json: no config recorded")
    cfg = update_config(job_path, base_manifest["config"], base_uri, list(overrides or []))
    method = cfg.valuation.method
    how = VALUERS.meta(method).get("updates")
    if how is None:
        able = ", ".join(sorted(VALUERS.having("updates", "refresh") + VALUERS.having("updates", "new-entities")))
        raise ConfigError(f"valuation.method {method} has no incremental update (methods that have one: {able}); "
                          f"value the whole log with `recval run`")
    state = read_state(fs, root, base_uri)
    if state.info.get("model_kind") != cfg.model.kind:
        raise ConfigError(f"{base_uri}: state/ holds a {state.info.get('model_kind')} model, the config a "
                          f"{cfg.model.kind}")
    base_id = base_manifest.get("run_id") or posixpath.basename(root.rstrip("/"))
    lineage = lineage_of(base_manifest, base_uri)
    run_id = run_id or cfg.output.run_id or cfg.name
    out = RunOutput(output_uri or cfg.output.uri, run_id, cfg.storage,
                    ray_write_rows=cfg.output.ray_write_rows).open(overwrite)
    if use_ray:
        from .ray_layer.session import ensure_ray
        try:
            ensure_ray(cfg.ray, None)
        except BaseException:
            out.abort()
            raise
    from .pipeline import release_hooks
    prof = Profiler(release=release_hooks(use_ray))
    timings: dict = {}
    source = cfg.data.path or cfg.data.format
    try:
        with out:
            with prof.stage("ingest") as st:
                dataset = read_new_log(cfg, state, use_ray)
                st.rows = len(dataset.interactions)
                _check_schema(state, dataset, source)
                u_codes, user_ids, new_users = extend_ids(state.user_ids, dataset.user_ids, "user", source)
                i_codes, item_ids, new_items = extend_ids(state.item_ids, dataset.item_ids, "item", source)
                n_users, n_items = len(user_ids), len(item_ids)
                split, fresh, set_aside = grown_split(state, dataset, u_codes, i_codes, n_users, n_items)
            n_base, n_new = len(state.split.train), len(fresh)
            log.info("update of %s: %d new rows (%d set aside), %d new users, %d new items; %d training rows now",
                     base_id, n_new, sum(set_aside.values()), new_users, new_items, len(split.train))
            depth = len(lineage)
            train_cfg = cfg.train
            if cfg.update.mode == "warm":
                train_cfg = dataclasses.replace(cfg.train, epochs=cfg.update.epochs,
                                                seed=update_seed(cfg.train.seed, depth),
                                                lr=cfg.update.lr if cfg.update.lr is not None else cfg.train.lr)
            with prof.stage("train", rows=len(split.train)):
                grown = []
                if cfg.update.mode == "full":
                    res = train_from_scratch(cfg, split.train, split.valid, tag="full")
                elif n_new == 0:
                    task, grown = warm_task(cfg, split, state, train_cfg)
                    task.model.eval()
                    res = TrainResult(task=task, best_epoch=-1)
                else:
                    task, grown = warm_task(cfg, split, state, train_cfg)
                    log.info("fine-tuning the base %s model %d epochs on old + new rows", cfg.model.kind,
                             cfg.update.epochs)
                    res = fit(task, train_cfg, valid=split.valid, exclude=[split.train], eval_cfg=cfg.evaluate,
                              log_prefix="[update] ")
                test_metrics = evaluate_ranking(res.model, split, cfg.evaluate, "test")
            with prof.stage("value", rows=len(split.train)):
                if n_new == 0 and cfg.update.mode == "warm":
                    # nothing arrived: the base run's values stand, marked with the runs that made them
                    valuation = Valuation(method=method, values=state.values.copy(), state=dict(state.valuer))
                    valued_by = state.valued_by
                    refreshed = 0
                else:
                    # the method grows what it saved to the grown model itself (e.g. influence
                    # pads its solve with zeros for new users and items)
                    prior = dict(state.valuer) if cfg.update.mode == "warm" and cfg.update.reuse_state \
                        and state.valuer else None
                    entity_update = how == "new-entities" and cfg.update.mode == "warm"
                    if entity_update:
                        prior = {"first_new_entity": {"user": state.split.train.n_users,
                                                      "item": state.split.train.n_items}}
                    valuer = VALUERS.get(method).factory(cfg.valuation)
                    ctx = ValuationContext(split=split, base=res, model_cfg=cfg.model,
                                           train_cfg=cfg.train if entity_update else train_cfg,
                                           eval_cfg=cfg.evaluate, seed=cfg.train.seed, prior=prior,
                                           progress=log.info)
                    t0 = time.perf_counter()
                    valuation = valuer.value(ctx)
                    valuation.info.setdefault("seconds", time.perf_counter() - t0)
                    valued_by = np.full(len(split.train), run_id, dtype=object)
                    refreshed = len(split.train)
                    if entity_update:
                        valued_by, refreshed = carry_entity_values(valuation, state, valued_by)
                is_new = np.zeros(len(split.train), bool)
                is_new[n_base:] = True
                valuation.columns = dict(valuation.columns, is_new=is_new,
                                         valued_by=np.asarray(valued_by, dtype=object))
            ds = Dataset(interactions=split.train, user_ids=user_ids, item_ids=item_ids)
            with prof.stage("prune", rows=len(split.train)):
                keep, _, _ = prune_masks(cfg, split, valuation, random_control=False)
                pruned = PruneOutcome(keep=keep, random_keep=None)
            with prof.stage("write", rows=len(split.train) + len(split.valid) + len(split.test)):
                values_tab = values_table(ds, split, valuation, keep)
                write_outputs(out, cfg, ds, split, valuation, pruned, values_tab, use_ray=False)
                counts = write_keep_drop_rows(out, ds, split, keep)
                write_state(out, user_ids=user_ids, item_ids=item_ids, split=split, model=res.model,
                            model_kind=cfg.model.kind, method=method, values=valuation.values,
                            valued_by=np.asarray(valued_by, dtype=object), valuer_state=valuation.state,
                            run_id=run_id, item_titles=grown_titles(state, dataset, item_ids))
            for s_ in prof.stages:
                timings[f"{s_.name}_s"] = s_.seconds
            info = {k: v for k, v in dict(valuation.info).items() if k != "history"}
            metrics = {
                "method": method, "model": cfg.model.kind, "source_run": base_uri,
                "update": {"base_run": base_id, "mode": cfg.update.mode, "depth": depth,
                           "epochs": cfg.update.epochs if cfg.update.mode == "warm" else res.epochs_run,
                           "new_log": source, "new_log_rows": len(dataset.interactions), "new_rows": n_new,
                           "set_aside": set_aside, "new_users": new_users, "new_items": new_items,
                           "users": n_users, "items": n_items, "base_rows": n_base,
                           "rows_refreshed": refreshed, "rows_carried": len(split.train) - refreshed,
                           "grown_tensors": grown, "cold_start": COLD_START_RULE,
                           "evaluation": "the base run's validation and test rows (new rows all train)",
                           "pruned_model": "not retrained in an update (recval run on pruned/ for its metrics)"},
                "test": {"updated": test_metrics},
                "training": {"best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
                             "seconds": round(res.seconds, 3), "history": res.history},
                "valuation": info,
                "prune": {"strategy": cfg.prune.strategy, "scope": cfg.prune.scope,
                          "dropped": int((~keep).sum()), "kept": int(keep.sum()),
                          "dropped_new": int((~keep & is_new).sum())},
                "keep_drop": counts, "profile": prof.summary(),
            }
            out.write_json("metrics.json", metrics)
            if cfg.output.report:
                out.write_text("report.html", update_report(run_id, base_id, metrics, valuation, is_new))
            timings["total_s"] = time.perf_counter() - t_all
            manifest = out.complete(kind="update", config=cfg.to_dict(), timings=timings, base_run=base_uri,
                                    lineage=lineage)
    finally:
        prof.close()
    k = next((m for m in test_metrics if m.startswith("recall@")), next(iter(test_metrics), None))
    manifest["metrics"] = metrics
    manifest["headline"] = (f"update {run_id} of {base_id}: {n_new} new rows ({new_users} new users, {new_items} new "
                            f"items; {sum(set_aside.values())} set aside), {refreshed} rows valued by {method}"
                            + (f"; test {k} {test_metrics[k]:.4f}" if k else "")
                            + f"; pruned {int((~keep).sum())} of {len(keep)} ({int((~keep & is_new).sum())} new)")
    return manifest


def update_report(run_id: str, base_id: str, metrics: dict, valuation, is_new: np.ndarray) -> str:
    """The update's report: what arrived, how it was valued, new vs old rows' values."""
    from .report import Report
    u = metrics["update"]
    rep = Report(f"recval update {run_id}", f"new rows valued against {base_id} ({u['mode']} update, lineage depth "
                                            f"{u['depth']})")
    rep.heading("What arrived")
    rep.key_values({k: u[k] for k in ("new_log", "new_log_rows", "new_rows", "new_users", "new_items",
                                      "base_rows", "rows_refreshed", "rows_carried")}
                   | {"set aside (pair already in the base run)": sum(u["set_aside"].values())})
    rep.paragraph(f"Cold start: {u['cold_start']}. Evaluation: {u['evaluation']}. Pruned model: {u['pruned_model']}.")
    vals = np.asarray(valuation.values, np.float64)
    ok = np.isfinite(vals)
    if ok.any():
        rep.heading("Values of new and old rows")
        rep.histogram({"old rows": vals[ok & ~is_new], "new rows": vals[ok & is_new]}, title="values",
                      xlabel=f"{metrics['method']} value")
    rep.heading("Test metrics of the updated model")
    rep.table([{"metric": k, "value": v} for k, v in metrics["test"]["updated"].items()])
    rep.heading("Stages")
    rep.table(metrics["profile"]["stages"])
    return rep.html()


def write_keep_drop_rows(out, ds, split, keep: np.ndarray) -> dict:
    """``drop/``: the training rows the pruning removes; ``keep/``: every other row of the current
    log (kept training rows, old and new, and the base run's validation and test rows), with
    original ids. (An update has no single input file to pass through: the log is the base run's
    rows plus the new ones.)"""
    from .pipeline import interactions_table
    out.write_table("drop", interactions_table(ds, split.train.take(~keep)), use_ray=False)
    kept = pa.concat_tables([interactions_table(ds, p) for p in (split.train.take(keep), split.valid, split.test)],
                            promote_options="default")
    out.write_table("keep", kept, use_ray=False)
    return {"input_rows": len(split.train) + len(split.valid) + len(split.test), "drop": int((~keep).sum()),
            "keep": kept.num_rows}
