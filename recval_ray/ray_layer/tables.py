"""Ray Data writers for a streamed input's pass-through: the input's own rows, re-read.

A streamed input (:class:`~recval_ray.ray_layer.ingest.StreamPlan`) keeps no copy of its own
columns on the driver. ``pruned/`` is therefore the input read again by the same reader, in
the same order (``preserve_order``), zipped by position with a one-byte keep mask over the
input rows, filtered in the workers and written by Ray Data; injected noise rows (which the
input does not have) follow with their ids only.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..core.data import Dataset, Interactions


class _KeepRows:
    """``map_batches``: keep the rows whose ``_keep`` flag is set; add ``is_noise`` (False)."""

    def __init__(self, noise_column: bool):
        self.noise_column = noise_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = batch.filter(batch["_keep"]).drop_columns(["_keep"])
        if self.noise_column:
            out = out.append_column("is_noise", pa.array(np.zeros(out.num_rows, dtype=bool)))
        return out


def write_pass_through(out, name: str, dataset: Dataset, kept: Interactions, noise_column: bool = True) -> None:
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
    body = ds.zip(flags).map_batches(_KeepRows(noise), batch_format="pyarrow", batch_size=None)
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
