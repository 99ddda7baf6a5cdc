"""Core data structures: interactions over contiguous indices, and the id maps back.

Everything downstream of ingestion (splits, noise, models, metrics, valuers) works on
:class:`Interactions`, plain numpy arrays over contiguous user and item indices
``0..n_users-1`` and ``0..n_items-1``. The :class:`Dataset` keeps the original ids
(integers or strings, whatever the input had) so every output can be written with them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp


COUNT_CHUNK = 1 << 22


def count_codes(codes: np.ndarray, n: int) -> np.ndarray:
    """``np.bincount(codes, minlength=n)`` chunk by chunk: bincount copies int32 codes to int64
    first (8 bytes a row of the whole log at once); here one chunk at a time."""
    out = np.zeros(n, dtype=np.int64)
    for a in range(0, len(codes), COUNT_CHUNK):
        out += np.bincount(codes[a:a + COUNT_CHUNK], minlength=n)
    return out


def flat_index(mask: np.ndarray, dtype=np.int64, chunk: int = 1 << 22) -> np.ndarray:
    """``np.flatnonzero(mask)`` as ``dtype`` (e.g. int32), chunk by chunk: no int64 copy of
    the whole index first."""
    out = np.empty(int(np.count_nonzero(mask)), dtype=dtype)
    pos = 0
    for a in range(0, len(mask), chunk):
        idx = np.flatnonzero(mask[a:a + chunk])
        out[pos:pos + len(idx)] = idx + a
        pos += len(idx)
    return out


def index_dtype(n: int) -> type:
    """int32 when indices ``0..n-1`` fit in it, else int64."""
    return np.int32 if n <= np.iinfo(np.int32).max else np.int64


@dataclass(frozen=True)
class Interactions:
    """A bag of (user, item) interactions over contiguous indices.

    ``rating``, ``timestamp``, ``is_noise`` and ``source_row`` are optional per-row arrays.
    ``source_row`` is the row of the interaction in :attr:`Dataset.source` (``-1`` for an
    interaction that the input did not have, e.g. injected noise).
    """

    user: np.ndarray
    item: np.ndarray
    n_users: int
    n_items: int
    rating: Optional[np.ndarray] = None
    timestamp: Optional[np.ndarray] = None
    is_noise: Optional[np.ndarray] = None
    source_row: Optional[np.ndarray] = None

    def __post_init__(self):
        # compact indices: int32 (4 bytes a row each) whenever the index space fits, which is
        # every realistic catalogue; arithmetic that can exceed 2^31 (pair keys) goes via int64
        object.__setattr__(self, "user", np.ascontiguousarray(self.user, dtype=index_dtype(self.n_users)))
        object.__setattr__(self, "item", np.ascontiguousarray(self.item, dtype=index_dtype(self.n_items)))
        n = len(self.user)
        if len(self.item) != n:
            raise ValueError("user and item arrays differ in length")
        for name in ("rating", "timestamp", "is_noise", "source_row"):
            a = getattr(self, name)
            if a is not None and len(a) != n:
                raise ValueError(f"{name} has {len(a)} rows, expected {n}")

    # -- basic shape -------------------------------------------------------------------
    def __len__(self) -> int:
        return int(len(self.user))

    @property
    def optional_fields(self) -> tuple[str, ...]:
        return tuple(f for f in ("rating", "timestamp", "is_noise", "source_row")
                     if getattr(self, f) is not None)

    def only(self, fields) -> "Interactions":
        """The same rows with only the optional ``fields`` kept (no copy of any array): what a
        retraining needs, before :meth:`take` copies its rows."""
        kw = {f: getattr(self, f) for f in self.optional_fields if f in tuple(fields)}
        return Interactions(self.user, self.item, self.n_users, self.n_items, **kw)

    def take(self, index: np.ndarray) -> "Interactions":
        """Rows ``index`` (an integer index array or a boolean mask)."""
        index = np.asarray(index)
        kw = {f: getattr(self, f)[index] for f in self.optional_fields}
        return Interactions(self.user[index], self.item[index], self.n_users, self.n_items, **kw)

    def concat(self, other: "Interactions") -> "Interactions":
        """Rows of ``self`` then rows of ``other`` (same index spaces).

        A field present on one side only is filled on the other: ``is_noise`` with False,
        ``source_row`` with -1, ``rating``/``timestamp`` with NaN / -1.
        """
        if (self.n_users, self.n_items) != (other.n_users, other.n_items):
            raise ValueError("cannot concat interactions over different index spaces")
        fill = {"rating": np.nan, "timestamp": -1, "is_noise": False, "source_row": -1}
        kw = {}
        for f in set(self.optional_fields) | set(other.optional_fields):
            parts = []
            for side in (self, other):
                a = getattr(side, f)
                if a is None:
                    ref = getattr(self, f) if getattr(self, f) is not None else getattr(other, f)
                    dtype = np.result_type(ref.dtype, np.float32) if f == "rating" else ref.dtype
                    a = np.full(len(side), fill[f], dtype=dtype)
                parts.append(a)
            kw[f] = np.concatenate(parts)
        return Interactions(np.concatenate([self.user, other.user]),
                            np.concatenate([self.item, other.item]),
                            self.n_users, self.n_items, **kw)

    def with_fields(self, **kw) -> "Interactions":
        return replace(self, **kw)

    # -- derived views -----------------------------------------------------------------
    def user_counts(self) -> np.ndarray:
        return count_codes(self.user, self.n_users)

    def item_counts(self) -> np.ndarray:
        return count_codes(self.item, self.n_items)

    def csr(self, values: Optional[np.ndarray] = None) -> sp.csr_matrix:
        """User x item sparse matrix; binary (1 per interaction, duplicates summed) by default."""
        data = np.ones(len(self), dtype=np.float32) if values is None else np.asarray(values, np.float32)
        m = sp.csr_matrix((data, (self.user, self.item)), shape=(self.n_users, self.n_items))
        m.sum_duplicates()
        return m

    def pair_keys(self) -> np.ndarray:
        """One int64 key per (user, item) pair: ``user * n_items + item`` (computed in place:
        8 bytes a row, no temporaries)."""
        keys = np.empty(len(self.user), dtype=np.int64)
        np.multiply(self.user, np.int64(self.n_items), out=keys)
        keys += self.item
        return keys


@dataclass
class Dataset:
    """Ingested interactions plus what is needed to map back to the input.

    ``user_ids[u]`` / ``item_ids[i]`` hold the original id of index ``u`` / ``i`` with the
    input's own type (int64 or string). ``source`` is the input table (its own column
    names), one row per interaction, so pruned outputs can pass the input's columns
    through. ``given_split`` (int8, 0 train / 1 valid / 2 test) is set by formats that come
    pre-split (LightGCN train/test files, Amazon JSON train/validation/test).
    """

    interactions: Interactions
    user_ids: pa.Array
    item_ids: pa.Array
    source: Optional[pa.Table] = None
    columns: dict = field(default_factory=lambda: {"user": "user_id", "item": "item_id",
                                                  "rating": None, "timestamp": None})
    given_split: Optional[np.ndarray] = None
    item_titles: Optional[pa.Array] = None
    warnings: list = field(default_factory=list)
    item_genres: Optional[np.ndarray] = None    # bool [n_items, G] item metadata (MovieLens genres)
    genre_names: Optional[list] = None
    # ratings at the input's precision, by input row, when float32 would change one (e.g. 0.1)
    rating_exact: Optional[np.ndarray] = None
    rating_type: Optional[pa.DataType] = None     # the input's numeric rating type (Parquet), for outputs
    stream: Optional[object] = None   # a streamed input's read plan (ray_layer.ingest.StreamPlan): no ``source``

    @property
    def n_users(self) -> int:
        return self.interactions.n_users

    @property
    def n_items(self) -> int:
        return self.interactions.n_items

    def release_interactions(self) -> None:
        """Drop the ingested rows once split (the split's parts hold every row a run uses), so
        the driver does not keep the log twice; ``n_users``, ``n_items`` and the id maps stay."""
        i = self.interactions
        empty = np.zeros(0, dtype=np.int64)
        self.interactions = Interactions(empty, empty, i.n_users, i.n_items)

    def original_users(self, index: np.ndarray) -> pa.Array:
        return self.user_ids.take(pa.array(np.asarray(index, dtype=np.int64)))

    def original_items(self, index: np.ndarray) -> pa.Array:
        return self.item_ids.take(pa.array(np.asarray(index, dtype=np.int64)))

    def original_ratings(self, part: "Interactions") -> pa.Array:
        """``part``'s ratings for output at the input's precision and type: the Parquet column's
        own numeric type (an int16 column stays int16), else float64 with the input's values
        (``0.1`` stays ``0.1``: the models compute in float32, outputs never show its rounding);
        null for rows the input did not have (injected noise)."""
        rows = part.source_row
        if self.rating_exact is not None and rows is not None:
            real = rows >= 0
            vals = np.where(real, self.rating_exact[np.where(real, rows, 0)], np.nan)
        else:
            vals = part.rating.astype(np.float64)
        out = pa.array(vals, pa.float64(), mask=np.isnan(vals))
        if self.rating_type is not None and self.rating_type != pa.float64():
            out = out.cast(self.rating_type)      # exact: the values came from that type
        return out


@dataclass(frozen=True)
class Split:
    """Train / validation / test interactions over the same index spaces."""

    train: Interactions
    valid: Interactions
    test: Interactions

    def parts(self) -> dict:
        return {"train": self.train, "valid": self.valid, "test": self.test}


def encode_ids(values: pa.Array | pa.ChunkedArray | np.ndarray) -> tuple[np.ndarray, pa.Array]:
    """Contiguous codes for ids, ordered by sorted original id (independent of row order).

    Returns ``(codes, uniques)`` with ``uniques[codes] == values``; integer ids stay
    int64, anything else becomes a string.
    """
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_integer(arr.type):
        arr = arr.cast(pa.int64())
    elif not pa.types.is_string(arr.type) and not pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    uniques = pc.unique(arr)
    uniques = uniques.take(pc.sort_indices(uniques))
    codes = pc.index_in(arr, value_set=uniques).to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, uniques
