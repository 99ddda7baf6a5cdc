"""Per-row arrays that wait on local disk while the stages between do not read them.

After the split, a run's driver holds per interaction columns that no model reads while it
trains (rating, timestamp, the input row: 20 bytes a row for MF) and, after the value stage,
the values (8 bytes a row); they are read again by the valuers, the prune step and the write
stage. :func:`spill` writes such an array to a temporary file and returns a read-only memory
map of it, the file already unlinked: the array costs no private memory, its pages come back
(from the page cache, reclaimable, not the heap) only while a stage reads them, and nothing is
left on disk however the process ends (the space is freed with the last map of it). Values
are unchanged bit for bit; a stage that tried to write into a spilled array fails loudly
(read-only) instead of corrupting it.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Iterable, Optional

import numpy as np

from .data import Interactions, Split


def spill(a: np.ndarray, directory: Optional[str] = None) -> np.ndarray:
    """``a`` as a read-only memory map of an unlinked temporary ``.npy`` file (same dtype,
    shape and values). Empty or already spilled arrays are returned as they are."""
    if a is None or isinstance(a, np.memmap) or a.size == 0:
        return a
    fd, path = tempfile.mkstemp(prefix="recval-spill-", suffix=".npy", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.ascontiguousarray(a), allow_pickle=False)
        return np.load(path, mmap_mode="r")
    finally:
        os.unlink(path)


def spill_interactions(part: Interactions, fields: Iterable[str], directory: Optional[str] = None
                       ) -> Interactions:
    """``part`` with its optional ``fields`` spilled (:func:`spill`); ids and the rest stay."""
    kw = {f: spill(getattr(part, f), directory) for f in fields if getattr(part, f) is not None}
    return dataclasses.replace(part, **kw) if kw else part


def spill_split(split: Split, fields: Iterable[str], directory: Optional[str] = None) -> Split:
    """Every part of ``split`` with ``fields`` spilled."""
    fields = tuple(fields)
    return Split(**{name: spill_interactions(part, fields, directory) for name, part in split.parts().items()})


def spillable_fields(model_reads: Iterable[str]) -> tuple[str, ...]:
    """The per-row fields a run can spill while a model that reads ``model_reads`` trains:
    rating, timestamp and source row unless the model reads them (``is_noise``, one byte a
    row, stays: evaluation and noise detection read it)."""
    reads = set(model_reads)
    return tuple(f for f in ("rating", "timestamp", "source_row") if f not in reads)
