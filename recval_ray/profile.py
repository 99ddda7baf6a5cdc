"""Per-stage profile of a run: wall seconds, rows, rows/s and the driver's peak RSS per stage.

A background thread samples this process's resident set size (``/proc/self/statm``; on other
systems ``resource.getrusage``'s lifetime peak) every ``interval`` seconds; each stage records the
highest sample seen while it ran, so a stage's peak includes what earlier stages left alive
(the driver's real footprint at that point), and ``bytes_per_row`` is that peak above the
interpreter's baseline (RSS when the profiler started), divided by the stage's rows.

``with profiler.stage("ingest") as s: ...; s.rows = n`` logs one line per stage; ``summary()``
is the ``profile`` section of ``metrics.json``.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

log = logging.getLogger("recval_ray")

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def release_free_heap() -> None:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``; nothing elsewhere).
    Arrays of a few MB (Ray Data blocks, chunks) are served from the heap, whose freed pages
    glibc keeps: without this, what one stage freed still counts in the next stage's peak."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int:
    """This process's resident set size now (bytes)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        import resource
        import sys
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def private_bytes() -> int:
    """This process's private resident memory (``RssAnon``: its heap, arrays and tensors),
    without shared mappings such as Ray's object store, whose pages a Ray driver maps while it
    reads blocks and which belong to the store (bounded by its configured size), not to the
    driver. Falls back to the RSS where ``/proc/self/status`` has no ``RssAnon``."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss_bytes()


@dataclass
class Stage:
    name: str
    seconds: float = 0.0
    rows: Optional[int] = None
    peak_rss: int = 0
    peak_private: int = 0
    note: str = ""

    def as_dict(self, baseline: int, baseline_private: int) -> dict:
        d = {"stage": self.name, "seconds": round(self.seconds, 3), "rows": self.rows,
             "rows_per_s": round(self.rows / self.seconds, 1) if self.rows and self.seconds > 0 else None,
             "peak_rss_mb": round(self.peak_rss / 2 ** 20, 1),
             "peak_private_mb": round(self.peak_private / 2 ** 20, 1),
             "bytes_per_row": round((self.peak_rss - baseline) / self.rows, 1) if self.rows else None,
             "private_bytes_per_row": round((self.peak_private - baseline_private) / self.rows, 1)
             if self.rows else None}
        if self.note:
            d["note"] = self.note
        return d


@dataclass
class Profiler:
    interval: float = 0.05
    baseline: int = field(default_factory=rss_bytes)
    baseline_private: int = field(default_factory=private_bytes)
    stages: list = field(default_factory=list)

    def __post_init__(self):
        self._current: Optional[Stage] = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._sample, name="recval-profile", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            r, p = rss_bytes(), private_bytes()
            with self._lock:
                if self._current is not None:
                    self._current.peak_rss = max(self._current.peak_rss, r)
                    self._current.peak_private = max(self._current.peak_private, p)

    @contextmanager
    def stage(self, name: str, rows: Optional[int] = None):
        release_free_heap()
        s = Stage(name, rows=rows, peak_rss=rss_bytes(), peak_private=private_bytes())
        with self._lock:
            self._current = s
        t0 = time.perf_counter()
        try:
            yield s
        finally:
            s.seconds = time.perf_counter() - t0
            s.peak_rss = max(s.peak_rss, rss_bytes())
            s.peak_private = max(s.peak_private, private_bytes())
            with self._lock:
                self._current = None
            self.stages.append(s)
            rate = f", {s.rows / s.seconds:,.0f} rows/s" if s.rows and s.seconds > 0 else ""
            per = (f", {(s.peak_rss - self.baseline) / s.rows:.0f} B/row "
                   f"({(s.peak_private - self.baseline_private) / s.rows:.0f} private)") if s.rows else ""
            log.info("stage %-13s %8.2f s%s%s, driver peak RSS %.0f MB (private %.0f MB)%s", name, s.seconds,
                     f", {s.rows:,} rows" if s.rows else "", rate, s.peak_rss / 2 ** 20,
                     s.peak_private / 2 ** 20, per)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)

    def summary(self) -> dict:
        return {"baseline_rss_mb": round(self.baseline / 2 ** 20, 1),
                "baseline_private_mb": round(self.baseline_private / 2 ** 20, 1),
                "peak_rss_mb": round(max([s.peak_rss for s in self.stages] + [self.baseline]) / 2 ** 20, 1),
                "peak_private_mb": round(max([s.peak_private for s in self.stages] + [self.baseline_private])
                                         / 2 ** 20, 1),
                "stages": [s.as_dict(self.baseline, self.baseline_private) for s in self.stages],
                "note": "the driver process only (Ray workers are not counted); sampled every %g s. RSS "
                        "includes the pages of Ray's object store the driver maps while reading blocks; "
                        "private = RssAnon, the driver's own memory. bytes_per_row = (stage peak - "
                        "baseline at the run's start) / stage rows" % self.interval}
