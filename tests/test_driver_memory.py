"""The driver's resident memory: exact stage peaks, and pages it has read but no longer holds
(spilled columns, Ray's object store) leaving its RSS without changing any value."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from recval_ray.core.data import count_codes
from recval_ray.core.spill import release_spilled_pages, row_chunks, spill
from recval_ray.profile import Profiler, memory_breakdown

linux = pytest.mark.skipif(not sys.platform.startswith("linux") or memory_breakdown() is None,
                           reason="reads /proc/self/status")
MB = 2 ** 20


@linux
def test_a_stage_peak_is_exact_where_the_sampler_sees_nothing():
    # a 160 MB array allocated and freed inside one stage; the sampler never runs (interval of
    # an hour), so only the kernel's high-water mark can see it; between stages too
    prof = Profiler(interval=3600)
    try:
        with prof.stage("spike", rows=1) as s:
            before = s.peak_rss
            a = np.ones(20_000_000)
            a.sum()
            del a
        assert s.peak_rss - before > 140 * MB
        with prof.stage("quiet", rows=1) as q:
            pass
        assert q.peak_rss - before < 60 * MB      # the next stage does not inherit the spike
        b = np.ones(30_000_000)                    # between stages: only the run's peak sees it
        b.sum()
        del b
        summary = prof.summary()
        assert summary["peak_rss_exact"] is True
        assert summary["peak_rss_mb"] * MB - before > 210 * MB
        assert max(st["peak_rss_mb"] for st in summary["stages"]) * MB - before < 200 * MB
    finally:
        prof.close()


@linux
def test_spilled_pages_leave_the_resident_set_and_come_back_unchanged(tmp_path):
    a = np.random.default_rng(0).standard_normal(8_000_000)   # 64 MB
    m = spill(a, str(tmp_path))
    total = float(m.sum())                          # every page read: mapped into this process
    read = memory_breakdown()["file"]
    assert release_spilled_pages() >= 1
    assert read - memory_breakdown()["file"] > 48 * MB
    assert float(m.sum()) == total and np.array_equal(m, a)     # faulted back, the same values
    # a chunked pass holds about one chunk of the column, not all of it
    release_spilled_pages()
    start = memory_breakdown()["file"]
    peak = 0
    for sl in row_chunks(len(m), 1_000_000):       # 8 MB chunks
        float(m[sl].sum())
        peak = max(peak, memory_breakdown()["file"] - start)
    assert peak < 24 * MB


@linux
def test_object_store_pages_leave_the_driver_and_objects_stay_readable(ray_session):
    from recval_ray.ray_layer.object_store import release_object_store_pages
    ray = ray_session
    ref = ray.put(np.arange(10_000_000, dtype=np.int64))       # 80 MB in the store
    got = ray.get(ref)
    assert int(got[::1000].sum()) == int(np.arange(0, 10_000_000, 1000).sum())
    int(got.sum())                                  # every page touched through the store's map
    held = memory_breakdown()["shared"]
    assert release_object_store_pages() > 0
    assert held - memory_breakdown()["shared"] > 60 * MB
    assert int(got.sum()) == 10_000_000 * 9_999_999 // 2          # still the object's values
    assert np.array_equal(ray.get(ref)[-5:], np.arange(9_999_995, 10_000_000))


def test_count_codes_equals_bincount_across_chunks(monkeypatch):
    from recval_ray.core import data
    monkeypatch.setattr(data, "COUNT_CHUNK", 7)
    codes = np.random.default_rng(1).integers(0, 13, 100).astype(np.int32)
    assert np.array_equal(count_codes(codes, 20), np.bincount(codes, minlength=20))
    assert np.array_equal(count_codes(codes[:0], 4), np.zeros(4, np.int64))
