"""The synthetic generator: deterministic, well-formed, and with a learnable structure."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
from scipy.stats import spearmanr

from recval_ray.config import SyntheticConfig
from recval_ray.core.synthetic import generate, generate_with_truth


def arrays(t: pa.Table):
    return (t["user_id"].to_numpy(), t["item_id"].to_numpy(), t["rating"].to_numpy(), t["timestamp"].to_numpy())


def test_deterministic_per_seed():
    cfg = SyntheticConfig(n_users=120, n_items=90, seed=3)
    assert generate(cfg).equals(generate(cfg))
    assert not generate(cfg).equals(generate(SyntheticConfig(n_users=120, n_items=90, seed=4)))


def test_well_formed():
    cfg = SyntheticConfig(n_users=2500, n_items=700, interactions_per_user=20, seed=1)  # > one chunk
    t = generate(cfg)
    assert t.schema == pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()),
                                  ("rating", pa.float64()), ("timestamp", pa.int64())])
    u, i, r, ts = arrays(t)
    counts = np.bincount(u, minlength=cfg.n_users)
    assert counts.min() >= 5 and len(np.unique(counts)) > 10           # varies per user
    assert abs(counts.mean() - cfg.interactions_per_user) < 2
    assert len(np.unique(u * cfg.n_items + i)) == len(u)                # distinct items per user
    assert (i >= 0).all() and (i < cfg.n_items).all()
    assert set(np.unique(r)) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert (np.diff(u) >= 0).all()
    same = np.diff(u) == 0
    assert (np.diff(ts)[same] > 0).all()                                # increasing within a user


def test_popularity_skew():
    cfg = SyntheticConfig(n_users=600, n_items=300, popularity_exponent=1.0, seed=2)
    t, truth = generate_with_truth(cfg)
    counts = np.bincount(t["item_id"].to_numpy(), minlength=cfg.n_items)
    assert spearmanr(counts, truth.log_popularity)[0] > 0.6
    top = np.sort(counts)[::-1]
    assert top[:30].sum() > 0.25 * counts.sum()                         # top 10% of items
    flat = generate(SyntheticConfig(n_users=600, n_items=300, popularity_exponent=0.0, seed=2))
    flat_counts = np.bincount(flat["item_id"].to_numpy(), minlength=cfg.n_items)
    assert counts.std() > 1.5 * flat_counts.std()


def test_structure_is_recoverable():
    cfg = SyntheticConfig(seed=5)
    t, truth = generate_with_truth(cfg)
    u, i, r, ts = arrays(t)
    rng = np.random.default_rng(0)
    # each user's last 20% by time are held out
    start = np.r_[0, np.flatnonzero(np.diff(u)) + 1]
    pos = np.arange(len(u)) - np.repeat(start, np.diff(np.r_[start, len(u)]))
    test = pos >= 0.8 * np.bincount(u)[u]
    rand_items = rng.integers(0, cfg.n_items, test.sum())
    aff_held, aff_rand = truth.affinity(u[test], i[test]), truth.affinity(u[test], rand_items)
    assert aff_held.mean() > aff_rand.mean() + 0.8
    assert spearmanr(truth.affinity(u, i), r)[0] > 0.5                  # ratings follow affinity

    # a rank-r SVD of the training interactions ranks held-out items above random ones,
    # clearly better than popularity does: the low-rank structure is learnable
    m = np.zeros((cfg.n_users, cfg.n_items))
    m[u[~test], i[~test]] = 1
    uu, s, vt = np.linalg.svd(m, full_matrices=False)
    score = (uu[:, :cfg.rank] * s[:cfg.rank]) @ vt[:cfg.rank]
    neg = m[u[test], rand_items] == 0
    tu, ti, ni = u[test][neg], i[test][neg], rand_items[neg]
    auc_svd = np.mean(score[tu, ti] > score[tu, ni])
    pop = m.sum(0)
    auc_pop = np.mean(pop[ti] > pop[ni])
    assert auc_svd > 0.75 and auc_svd > auc_pop + 0.05
