"""Spilled per-row arrays (core/spill.py): same values, read-only, nothing left on disk."""
from __future__ import annotations

import os

import numpy as np
import pytest

from recval_ray.core.data import Interactions, Split
from recval_ray.core.spill import spill, spill_split, spillable_fields


def part(n: int, seed: int) -> Interactions:
    rng = np.random.default_rng(seed)
    return Interactions(rng.integers(0, 50, n), rng.integers(0, 80, n), 50, 80,
                        rating=rng.random(n).astype(np.float32), timestamp=rng.integers(0, 10 ** 12, n),
                        is_noise=rng.random(n) < 0.2, source_row=np.arange(n, dtype=np.int64))


def test_spill_is_a_read_only_map_of_the_same_values_and_leaves_no_file(tmp_path):
    a = np.random.default_rng(0).standard_normal(1000)
    m = spill(a, str(tmp_path))
    assert isinstance(m, np.memmap) and m.dtype == a.dtype and np.array_equal(m, a)
    assert os.listdir(tmp_path) == []          # unlinked at once: freed with the map
    with pytest.raises(ValueError):
        m[0] = 1.0                             # a stage writing into it fails, loudly
    assert spill(m, str(tmp_path)) is m and spill(np.zeros(0), str(tmp_path)).size == 0


def test_spill_split_moves_only_the_fields_the_model_does_not_read(tmp_path):
    split = Split(part(500, 0), part(100, 1), part(120, 2))
    fields = spillable_fields(("timestamp",))          # the LSTM reads its timestamps
    assert fields == ("rating", "source_row")
    spilled = spill_split(split, fields, str(tmp_path))
    for name, p in spilled.parts().items():
        q = split.parts()[name]
        for f in ("user", "item", "timestamp", "is_noise"):
            assert not isinstance(getattr(p, f), np.memmap), f
        for f in ("rating", "source_row"):
            assert isinstance(getattr(p, f), np.memmap), f
        for f in ("user", "item", "rating", "timestamp", "is_noise", "source_row"):
            assert np.array_equal(getattr(p, f), getattr(q, f)), f
    # what a retraining copies out of a spilled part is an ordinary array
    kept = spilled.train.take(np.arange(0, 500, 2))
    assert not isinstance(kept.rating, np.memmap) and np.array_equal(kept.rating, split.train.rating[::2])
    assert os.listdir(tmp_path) == []
