"""Per-stage profile of a run: wall seconds, rows, rows/s and the driver's peak RSS per stage.

A stage's peak RSS is exact on Linux: the kernel's high-water mark (``VmHWM``) is reset when the
stage starts (``/proc/self/clear_refs``) and read when it ends, so no short spike is missed
(elsewhere, and for the private memory, ``RssAnon``, which has no high-water mark, a background
thread samples every ``interval`` seconds, which can miss a spike while a C call holds the GIL).
A stage's peak includes what earlier stages left alive (the driver's real footprint at that
point), and ``bytes_per_row`` is that peak above the interpreter's baseline (RSS when the
profiler started), divided by the stage's rows. The run's peak (``summary()["peak_rss_mb"]``)
also covers the time between stages. (The reset lowers the process's lifetime peak too: what
``getrusage`` or ``/usr/bin/time`` report after the run covers the last stage only.)

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

from .core.memory import release_free_heap  # noqa: F401 - re-exported (pipeline, stages)

log = logging.getLogger("recval_ray")

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


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


def _status_kb(key: bytes) -> Optional[int]:
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_breakdown() -> Optional[dict]:
    """This process's resident memory now by kind (bytes; Linux): ``private`` (RssAnon: heap,
    arrays, tensors), ``file`` (RssFile: mapped files: library code, memory-mapped spilled
    columns) and ``shared`` (RssShmem: shared memory such as Ray's object store)."""
    keys = {b"RssAnon:": "private", b"RssFile:": "file", b"RssShmem:": "shared"}
    out = {}
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                k = line.split(b"\t", 1)[0].split(b" ", 1)[0]
                if k in keys:
                    out[keys[k]] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return out if len(out) == 3 else None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ``clear_refs`` 5); False where
    that is not possible (then peaks are sampled)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> Optional[int]:
    """The kernel's peak RSS of this process since the last :func:`reset_peak_rss` (``VmHWM``)."""
    return _status_kb(b"VmHWM:")


def private_bytes() -> int:
    """This process's private resident memory (``RssAnon``: its heap, arrays and tensors),
    without shared mappings such as Ray's object store, whose pages a Ray driver maps while it
    reads blocks and which belong to the store (bounded by its configured size), not to the
    driver. Falls back to the RSS where ``/proc/self/status`` has no ``RssAnon``."""
    anon = _status_kb(b"RssAnon:")
    return rss_bytes() if anon is None else anon


@dataclass
class Stage:
    name: str
    seconds: float = 0.0
    rows: Optional[int] = None
    peak_rss: int = 0
    peak_private: int = 0
    note: str = ""
    sampled_peak: int = 0                   # the highest sampled RSS and its kinds at that moment
    at_sampled_peak: Optional[dict] = None

    def as_dict(self, baseline: int, baseline_private: int) -> dict:
        d = {"stage": self.name, "seconds": round(self.seconds, 3), "rows": self.rows,
             "rows_per_s": round(self.rows / self.seconds, 1) if self.rows and self.seconds > 0 else None,
             "peak_rss_mb": round(self.peak_rss / 2 ** 20, 1),
             "peak_private_mb": round(self.peak_private / 2 ** 20, 1),
             "bytes_per_row": round((self.peak_rss - baseline) / self.rows, 1) if self.rows else None,
             "private_bytes_per_row": round((self.peak_private - baseline_private) / self.rows, 1)
             if self.rows else None}
        if self.at_sampled_peak:
            d["sampled_peak_mb"] = {k: round(v / 2 ** 20, 1) for k, v in self.at_sampled_peak.items()}
        if self.note:
            d["note"] = self.note
        return d


@dataclass
class Profiler:
    interval: float = 0.05
    baseline: int = field(default_factory=rss_bytes)
    baseline_private: int = field(default_factory=private_bytes)
    stages: list = field(default_factory=list)
    # called before each stage: what frees memory the driver no longer needs (e.g. the Ray
    # layer's release of object-store pages), so a stage's peak is not an earlier stage's
    release: tuple = ()

    def __post_init__(self):
        self._current: Optional[Stage] = None
        self.run_peak_rss = self.baseline     # the whole run's peak, between stages included
        self._exact = reset_peak_rss()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._sample, name="recval-profile", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            kinds = memory_breakdown()
            r = rss_bytes()
            p = kinds["private"] if kinds else private_bytes()
            with self._lock:
                s = self._current
                if s is not None:
                    s.peak_rss = max(s.peak_rss, r)
                    s.peak_private = max(s.peak_private, p)
                    if kinds and r > s.sampled_peak:
                        s.sampled_peak, s.at_sampled_peak = r, kinds

    def _take_peak(self) -> int:
        """The kernel's peak RSS since the last reset (then reset), folded into the run's peak."""
        peak = peak_rss_bytes() if self._exact else None
        peak = rss_bytes() if peak is None else peak
        self.run_peak_rss = max(self.run_peak_rss, peak)
        if self._exact:
            reset_peak_rss()
        return peak

    @contextmanager
    def stage(self, name: str, rows: Optional[int] = None):
        release_free_heap()
        from .core.spill import release_spilled_pages
        release_spilled_pages()               # spilled columns' pages an earlier stage read
        for hook in self.release:
            hook()
        self._take_peak()                     # what ran before this stage: the run's peak only
        s = Stage(name, rows=rows, peak_rss=rss_bytes(), peak_private=private_bytes())
        with self._lock:
            self._current = s
        t0 = time.perf_counter()
        try:
            yield s
        finally:
            s.seconds = time.perf_counter() - t0
            s.peak_rss = max(s.peak_rss, rss_bytes(), self._take_peak())
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
                "peak_rss_mb": round(max([s.peak_rss for s in self.stages] + [self.baseline, self._take_peak()])
                                     / 2 ** 20, 1),
                "peak_private_mb": round(max([s.peak_private for s in self.stages] + [self.baseline_private])
                                         / 2 ** 20, 1),
                "stages": [s.as_dict(self.baseline, self.baseline_private) for s in self.stages],
                "peak_rss_exact": self._exact,
                "note": "the driver process only (Ray workers are not counted). RSS peaks: the kernel's "
                        "high-water mark per stage (exact) where peak_rss_exact, else sampled every %g s; "
                        "private peaks sampled every %g s. peak_rss_mb covers the whole run. RSS "
                        "includes the pages of Ray's object store the driver maps while reading blocks; "
                        "private = RssAnon, the driver's own memory. bytes_per_row = (stage peak - "
                        "baseline at the run's start) / stage rows" % (self.interval, self.interval)}
