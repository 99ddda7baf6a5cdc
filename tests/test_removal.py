"""The removal experiment's shared tables (recval_ray.core.removal): the long table's layout and
the summary's statistics, paired by seed."""
import numpy as np
import pytest

from recval_ray.core.removal import long_table, summarise


def test_long_table_one_row_per_seed_variant_metric_with_extra_columns():
    scores = np.arange(2 * 3 * 2, dtype=float).reshape(2, 3, 2)
    t = long_table(["full", "a", "b"], [7, 9], ["m1", "m2"], scores,
                   extra={"examples": np.array([[10, 8, 8], [10, 8, 8]]), "protocol": np.full((2, 3, 2), "p")})
    assert len(t["value"]) == 12 and set(t) == {"variant", "seed", "metric", "value", "examples", "protocol"}
    i = next(i for i in range(12) if (t["seed"][i], t["variant"][i], t["metric"][i]) == (9, "b", "m1"))
    assert t["value"][i] == scores[1, 2, 0] and t["examples"][i] == 8
    with pytest.raises(ValueError, match="shape"):
        long_table(["full"], [1, 2], ["m"], np.zeros((2, 2, 1)))


def test_summary_pairs_by_seed_and_skips_a_zero_baseline():
    # seed 1: full 1.0, drop 1.5 (+50%); seed 2: full 2.0, drop 2.0 (0%); seed 3: full 0 (skipped)
    scores = np.array([[[1.0]], [[2.0]], [[0.0]]])
    scores = np.concatenate([scores, np.array([[[1.5]], [[2.0]], [[5.0]]])], axis=1)
    s = summarise(long_table(["full", "drop"], [1, 2, 3], ["m"], scores), baseline="full")
    assert s["variant"] == ["full", "drop"] and s["n_seeds"] == [3, 3]
    assert s["mean"][0] == pytest.approx(1.0) and s["relative_diff"][0] == 0.0
    assert s["relative_diff"][1] == pytest.approx(0.25)                       # mean of +50% and 0%
    assert s["relative_se"][1] == pytest.approx(np.std([0.5, 0.0], ddof=1) / np.sqrt(2))
    assert s["se"][1] == pytest.approx(np.std([1.5, 2.0, 5.0], ddof=1) / np.sqrt(3))


def test_one_seed_has_no_spread_and_an_unknown_baseline_is_an_error():
    s = summarise(long_table(["full", "x"], [4], ["m"], np.array([[[1.0], [2.0]]])), baseline="full")
    assert s["relative_diff"][1] == pytest.approx(1.0) and np.isnan(s["se"][1]) and np.isnan(s["relative_se"][1])
    with pytest.raises(ValueError, match="baseline"):
        summarise(long_table(["a"], [1], ["m"], np.ones((1, 1, 1))), baseline="full")
