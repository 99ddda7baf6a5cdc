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

Pages a stage has read stay mapped into the process (its RSS, as file pages) until they are
released: :func:`release_spilled_pages` drops every live spilled map's pages from this process
(``madvise(MADV_DONTNEED)`` on a read-only file map: the data stays in the file and the page
cache, a later read faults it back), called between stages and between written chunks.
"""
from __future__ import annotations

import dataclasses
import mmap
import os
import tempfile
import weakref
from typing import Iterable, Optional

import numpy as np

from .data import Interactions, Split

_MAPS: "weakref.WeakSet[mmap.mmap]" = weakref.WeakSet()   # the maps of live spilled arrays


def spill(a: np.ndarray, directory: Optional[str] = None) -> np.ndarray:
    """``a`` as a read-only memory map of an unlinked temporary ``.npy`` file (same dtype,
    shape and values). Empty or already spilled arrays are returned as they are."""
    if a is None or isinstance(a, np.memmap) or a.size == 0:
        return a
    fd, path = tempfile.mkstemp(prefix="recval-spill-", suffix=".npy", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.ascontiguousarray(a), allow_pickle=False)
        out = np.load(path, mmap_mode="r")
    finally:
        os.unlink(path)
    if isinstance(getattr(out, "_mmap", None), mmap.mmap):
        _MAPS.add(out._mmap)
    return out


def release_spilled_pages() -> int:
    """Drop the pages of every live spilled array from this process's resident set; returns
    how many maps were released. Values are unchanged (read-only file maps: the next read
    faults the page back from the page cache or the file)."""
    done = 0
    advice = getattr(mmap, "MADV_DONTNEED", None)
    for m in list(_MAPS):
        if advice is None or m.closed:
            continue
        try:
            m.madvise(advice)
            done += 1
        except (OSError, ValueError):
            pass
    return done


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


def row_chunks(n: int, rows: int):
    """Index ranges ``[0, rows), [rows, 2 rows), ...`` of ``n`` rows; after each chunk has been
    consumed, the spilled columns' pages it read leave the resident set
    (:func:`release_spilled_pages`), so a pass over a spilled column holds one chunk of it."""
    for s in range(0, n, rows):
        yield np.arange(s, min(s + rows, n))
        release_spilled_pages()
