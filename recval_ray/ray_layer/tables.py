"""Ray Data writers for a streamed input's pass-through: the input's own rows, re-read.

A streamed input (:class:`~recval_ray.ray_layer.ingest.StreamPlan`) keeps no copy of its own
columns on the driver. ``pruned/`` is therefore the input read again by the same reader, in
the same order (``preserve_order``), zipped by position with a one-byte keep mask over the
input rows, filtered in the workers and written by Ray Data; injected noise rows (which the
input does not have) follow with their ids only.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa

from ..core.data import Dataset, Interactions
from ..core.text_types import block_flags, combine_flags, typed_text_columns


class _KeepRows:
    """``map_batches``: keep the rows whose ``_keep`` flag is set, text columns parsed to
    ``types``; add ``is_noise`` (False)."""

    def __init__(self, noise_column: bool, types: Optional[dict] = None):
        self.noise_column, self.types = noise_column, types

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = batch.filter(batch["_keep"]).drop_columns(["_keep"])
        if self.types:
            out = typed_text_columns(out, self.types)
        if self.noise_column:
            out = out.append_column("is_noise", pa.array(np.zeros(out.num_rows, dtype=bool)))
        return out


def write_pass_through(out, name: str, dataset: Dataset, kept: Interactions, noise_column: bool = True,
                       types: Optional[dict] = None) -> None:
    """Write the input rows of ``kept`` (the input's own columns, in input order), then its
    injected rows (ids only), under ``<name>/``; ``is_noise`` only with ``noise_column``."""
    import ray

    plan = dataset.stream
    n_input = sum(plan.counts) if plan.counts else None
    rows = kept.source_row
    real = rows >= 0
    ds = plan.read()
    if n_input is None:
        n_input = ds.count()
    mask = np.zeros(n_input, dtype=bool)
    mask[rows[real]] = True
    flags = ray.data.from_arrow(pa.table({"_keep": mask}))
    noise = kept.is_noise is not None and noise_column
    body = _zip(ds, flags).map_batches(_KeepRows(noise, types), batch_format="pyarrow", batch_size=None)
    if (~real).any():
        extra = kept.take(~real)
        ucol, icol = dataset.columns["user"], dataset.columns["item"]
        schema = body.schema()
        cols = {}
        for col, type_ in zip(schema.names, schema.types):
            if col == ucol:
                cols[col] = dataset.original_users(extra.user).cast(type_)
            elif col == icol:
                cols[col] = dataset.original_items(extra.item).cast(type_)
            elif col == "is_noise":
                cols[col] = pa.array(np.ones(len(extra), dtype=bool))
            else:
                cols[col] = pa.nulls(len(extra), type_)
        body = body.union(ray.data.from_arrow(pa.table(cols)))
    out.write_dataset(name, body, int(real.sum()) + int((~real).sum()))


class _Select:
    """``map_batches``: the rows whose ``_drop`` flag equals ``dropped``, without the flag."""

    def __init__(self, dropped: bool, types: Optional[dict] = None):
        self.dropped, self.types = dropped, types

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow.compute as pc
        flag = batch["_drop"] if self.dropped else pc.invert(batch["_drop"])
        out = batch.filter(flag).drop_columns(["_drop"])
        return typed_text_columns(out, self.types) if self.types else out


class _Flags:
    """``map_batches``: one row per block, its :func:`~..core.text_types.block_flags` (JSON)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        import json
        return pa.table({"flags": [json.dumps(block_flags(batch))]})


def stream_text_types(dataset: Dataset) -> dict:
    """The reader types of a streamed text input's columns, over every block (one pass)."""
    import json
    rows = dataset.stream.read().map_batches(_Flags(), batch_format="pyarrow", batch_size=None).take_all()
    return combine_flags([json.loads(r["flags"]) for r in rows])


def _zip(ds, flags):
    """``ds.zip(flags)`` by position. Ray 2.60 deprecates ``zip`` because positions are only
    stable when blocks keep their order; the ingestion plan reads with ``preserve_order``, so
    the positions here are the input's, and the deprecation notice is not shown to users."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return ds.zip(flags)


def write_keep_drop(out, dataset: Dataset, drop_rows: np.ndarray, types: Optional[dict] = None) -> dict:
    """A streamed input's ``drop/`` (its rows at ``drop_rows``, input positions) and ``keep/``
    (every other input row), the input's own columns as read, Ray Data end to end."""
    import ray

    plan = dataset.stream
    ds = plan.read()
    n_input = sum(plan.counts) if plan.counts else ds.count()
    mask = np.zeros(n_input, dtype=bool)
    mask[drop_rows] = True
    both = _zip(ds, ray.data.from_arrow(pa.table({"_drop": mask})))
    n_drop = int(mask.sum())
    for name, dropped, rows in (("drop", True, n_drop), ("keep", False, n_input - n_drop)):
        if rows:
            out.write_dataset(name, both.map_batches(_Select(dropped, types), batch_format="pyarrow",
                                                     batch_size=None), rows)
        else:
            empty = ds.schema().base_schema.empty_table()
            out.write_table(name, typed_text_columns(empty, types) if types else empty, use_ray=False)
    return {"input_rows": int(n_input), "drop": n_drop, "keep": int(n_input - n_drop)}


def input_table(dataset: Dataset) -> pa.Table:
    """A streamed input's rows, every column as the reader gives it (text columns stay text),
    in input order, on the driver: for inputs small enough that one read beats a Ray Data
    pass per output (``output.ray_write_rows``)."""
    ds = dataset.stream.read()
    blocks = [b for b in ds.iter_batches(batch_size=None, batch_format="pyarrow") if b.num_rows]
    return pa.concat_tables(blocks) if blocks else ds.schema().base_schema.empty_table()


def read_input_rows(dataset: Dataset, positions: np.ndarray, columns: list) -> pa.Table:
    """``columns`` of a streamed input's rows at ``positions`` (input order), read again by
    Ray Data and filtered in the workers: only those rows reach the driver."""
    import ray

    plan = dataset.stream
    ds = plan.read(columns)
    n_input = sum(plan.counts) if plan.counts else ds.count()
    mask = np.zeros(n_input, dtype=bool)
    mask[positions] = True
    picked = _zip(ds, ray.data.from_arrow(pa.table({"_drop": mask}))).map_batches(
        _Select(True), batch_format="pyarrow", batch_size=None)
    blocks = [b for b in picked.iter_batches(batch_size=None, batch_format="pyarrow") if b.num_rows]
    return pa.concat_tables(blocks) if blocks else ds.schema().empty_table()
