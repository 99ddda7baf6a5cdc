"""The driver's view of Ray's object store: releasing the store pages it has already read.

A Ray driver that reads a block from the local object store maps the store's shared memory
file (``/dev/shm/plasma...``, a shared map) and every page it touches stays in its resident set
until the map goes, long after the block was copied into compact arrays and freed: streaming
ingestion of 10M rows left ~350 MB of store pages in the driver's RSS for the rest of the run.
:func:`release_object_store_pages` drops them from this process (``madvise(MADV_DONTNEED)`` on
the shared map: the store keeps its contents; objects still in use fault their pages back on
the next read), so the driver's RSS is its own memory. The store's memory itself is bounded by
``object_store_memory`` and sized separately (``cluster/README.md``).
"""
from __future__ import annotations

import ctypes
import os

_MADV_DONTNEED = 4
_libc = None


def _store_maps() -> list[tuple[int, int]]:
    """(start, length) of this process's shared maps of Ray's object-store file."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 6 or len(parts[1]) < 4 or parts[1][3] != "s":
                    continue
                if not os.path.basename(parts[5]).startswith("plasma"):
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi - lo))
    except OSError:
        return []
    return out


def release_object_store_pages() -> int:
    """Drop the object store's pages from this process's resident set (Linux; elsewhere a
    no-op). Returns the bytes of store maps advised."""
    global _libc
    maps = _store_maps()
    if not maps:
        return 0
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except (OSError, AttributeError):
            return 0
    done = 0
    for start, length in maps:
        if _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_DONTNEED) == 0:
            done += length
    return done
