"""Giving freed memory back to the system (no Ray, no torch)."""
from __future__ import annotations

_trim = None


def release_free_heap() -> None:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``; nothing elsewhere).

    Arrays of up to 32 MB (glibc's dynamic mmap threshold: Ray Data blocks, per-block columns,
    chunks) are served from the heap, whose freed pages glibc keeps, also in the middle of the
    heap: without this, memory a step freed still counts in the process's resident set while the
    next step allocates more (10M rows: ~200 MB of freed per-block arrays during ingestion)."""
    global _trim
    if _trim is None:
        try:
            import ctypes
            _trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)
