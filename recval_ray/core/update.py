"""Incremental valuation: the Ray-free pieces of ``recval update`` (new rows against an earlier run).

An update continues a base run: its id maps grow by the new log's unseen users and items
(appended after the base codes, in sorted original-id order, so every base code keeps its
meaning), its model is warm-started from the base run's selected weights (every tensor copied
into the leading block of its grown shape: the rows or columns of new users and items keep their
seeded initialisation), and a method's saved state (e.g. influence's inverse-Hessian solve) is
padded the same way, with zeros for the new entities, as the starting point of the new solve.

``agreement(a, b)``: how far incremental values agree with a full rerun on the same rows
(Spearman and the overlap of the top fraction).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import InputError


def id_type_name(t: pa.DataType) -> str:
    return "integer" if pa.types.is_integer(t) else "string"


def extend_ids(base_ids: pa.Array, new_ids: pa.Array, what: str, source: str) -> tuple[np.ndarray, pa.Array, int]:
    """``(codes of new_ids, the grown id map, how many ids were added)``: ids the base map holds
    keep their code; unseen ones get codes ``len(base_ids), ...`` in sorted id order. The two
    maps must hold the same kind of id (integer or string): else :class:`InputError` naming
    ``source`` (the new log) and ``what`` (``user`` / ``item``)."""
    if isinstance(new_ids, pa.ChunkedArray):
        new_ids = new_ids.combine_chunks()
    if id_type_name(base_ids.type) != id_type_name(new_ids.type):
        raise InputError(f"{source}: the {what} ids are {id_type_name(new_ids.type)}s but the base run's are "
                         f"{id_type_name(base_ids.type)}s: an update must hold the same {what} ids as its base run")
    if new_ids.type != base_ids.type:
        new_ids = new_ids.cast(base_ids.type)
    codes = pc.index_in(new_ids, value_set=base_ids).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    unseen = codes < 0
    if not unseen.any():
        return codes, base_ids, 0
    fresh = pc.unique(new_ids.filter(pa.array(unseen)))
    fresh = fresh.take(pc.sort_indices(fresh))
    codes[unseen] = len(base_ids) + pc.index_in(new_ids.filter(pa.array(unseen)), value_set=fresh) \
        .to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, pa.concat_arrays([base_ids, fresh.cast(base_ids.type)]), len(fresh)


def grow_tensor(old, like):
    """``like`` (a fresh tensor of the grown shape) with ``old`` copied into its leading block
    (every dimension of ``old`` must be at most ``like``'s: a model grows, never shrinks)."""
    if tuple(old.shape) == tuple(like.shape):
        return old.to(dtype=like.dtype).clone()
    if old.dim() != like.dim() or any(a > b for a, b in zip(old.shape, like.shape)):
        raise ValueError(f"cannot grow a tensor of shape {tuple(old.shape)} into {tuple(like.shape)}")
    out = like.clone()
    out[tuple(slice(0, n) for n in old.shape)] = old.to(dtype=like.dtype)
    return out


def grow_state(old: Mapping, fresh: Mapping) -> tuple[dict, list]:
    """The grown model's state dict: every tensor of ``fresh`` (the new model's seeded
    initialisation) with the base run's tensor copied into its leading block; returns the names
    that grew. A name the base lacks, or a base tensor that does not fit, is an error (the base
    run trained another model)."""
    out, grown = {}, []
    missing = sorted(set(fresh) - set(old))
    if missing:
        raise ValueError(f"the base run's model has no {', '.join(missing[:5])}: it is not this model")
    for name, like in fresh.items():
        t = old[name]
        if tuple(t.shape) != tuple(like.shape):
            grown.append(name)
        out[name] = grow_tensor(t, like)
    return out, grown


def pad_like(old: Mapping, shapes: Mapping) -> dict:
    """Tensors of ``old`` zero-padded to ``shapes`` (name -> shape): a base run's state per
    parameter laid out for the grown model (new users and items: zero)."""
    import torch
    out = {}
    for name, shape in shapes.items():
        t = old[name]
        out[name] = grow_tensor(t, torch.zeros(tuple(shape), dtype=t.dtype))
    return out


@dataclass
class Agreement:
    """Incremental vs full-rerun values on the same rows: Spearman's rho, the share of the full
    rerun's top ``top`` fraction that the incremental values also put there, and the rows."""
    spearman: float
    top_overlap: float
    bottom_overlap: float
    rows: int
    top: float

    def as_dict(self) -> dict:
        return {"spearman": self.spearman, "top_overlap": self.top_overlap,
                "bottom_overlap": self.bottom_overlap, "rows": self.rows, "top": self.top}


def agreement(incremental: np.ndarray, full: np.ndarray, top: float = 0.1) -> Agreement:
    """:class:`Agreement` of two value vectors over the rows where both are finite; overlaps
    of the highest and of the lowest ``top`` fraction (ties broken by row order)."""
    from .counterfactual import spearman
    a, b = np.asarray(incremental, np.float64), np.asarray(full, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    n = len(a)
    if n < 2:
        return Agreement(float("nan"), float("nan"), float("nan"), n, top)
    k = max(1, int(round(top * n)))
    hi_a, hi_b = np.argsort(-a, kind="stable")[:k], np.argsort(-b, kind="stable")[:k]
    lo_a, lo_b = np.argsort(a, kind="stable")[:k], np.argsort(b, kind="stable")[:k]
    return Agreement(float(spearman(a, b)), len(np.intersect1d(hi_a, hi_b)) / k,
                     len(np.intersect1d(lo_a, lo_b)) / k, n, top)


def known_pairs(parts, n_items: int) -> np.ndarray:
    """Sorted ``user * n_items + item`` keys of the rows of ``parts`` (Interactions over the
    grown index spaces)."""
    keys = [p.user.astype(np.int64) * np.int64(n_items) + p.item.astype(np.int64) for p in parts]
    return np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)


def in_sorted(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Boolean: which ``keys`` occur in ``sorted_keys``."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), bool)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[pos] == keys


def lineage_of(base_manifest: Mapping, base_uri: str) -> list:
    """The base run's lineage plus the base run itself: the chain of runs back to the first
    full run (oldest first), each ``{run_id, uri, kind}``."""
    chain = list(base_manifest.get("lineage") or [])
    chain.append({"run_id": base_manifest.get("run_id"), "uri": base_manifest.get("uri") or base_uri,
                  "kind": base_manifest.get("kind") or "run"})
    return chain


def update_seed(seed: int, depth: int) -> int:
    """The fine-tune's batch seed of the ``depth``-th update of a chain: a stream of its own
    (the base's epochs are not replayed), a pure function of the job's seed and the depth."""
    state = np.random.SeedSequence([int(seed), 0x0D47E, int(depth)]).generate_state(1, dtype=np.uint32)
    return int(state[0])


def carried(values: Optional[np.ndarray], n_new: int) -> np.ndarray:
    """Base values for the base rows and NaN for ``n_new`` appended rows."""
    base = np.asarray(values if values is not None else np.zeros(0), np.float64)
    return np.concatenate([base, np.full(n_new, np.nan)])
