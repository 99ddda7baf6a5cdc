"""How separable are injected (noisy) interactions by their training loss, globally vs per user?

The PLD paper's diagnostic (its Table 2 and Figures 1-3): a global loss criterion (T-CE,
small-loss) compares every interaction with all others, where the high-loss normal
interactions of some users mix with the low-loss noisy interactions of others; a personal
criterion compares an interaction only with the same user's other interactions.

For losses ``l`` with users ``u`` and ground truth ``is_noise``:

* ``standardise_within_user(l, u)``: ``z = (l - mean_u l) / std_u l`` (population std over the
  user's rows; 0 for users with one row or constant losses);
* range overlap: a noisy interaction overlaps when its loss lies inside the range
  ``[min, max]`` of the normal losses, all normal interactions (global) or the same user's
  normal interactions (personal; users without normal interactions: no overlap);
* threshold overlap: a noisy interaction overlaps when it is *not* among the ``n_noise``
  largest losses (global) or not among its user's ``n_u`` largest losses, ``n_u`` = the user's
  injected count (personal): the noise a loss threshold at the true count would keep;
* ROC AUC of the loss (global) and of ``z`` (personal) for ``is_noise``.
"""
from __future__ import annotations

import numpy as np

from ...evaluation import noise_detection


STANDARDISE_CHUNK = 1 << 20     # rows per pass step of standardise_within_user


def standardise_within_user(loss: np.ndarray, user: np.ndarray, n_users: int | None = None) -> np.ndarray:
    """``(l - mean_u) / std_u`` per row (module doc); NaN losses stay NaN and are left out of
    their user's mean and std. Three passes over chunks of rows (counts and sums, squared
    deviations, the z-scores): per-user arrays and one chunk's temporaries, not a dozen
    whole-log ones (a log of one chunk gets exactly the one-pass arithmetic)."""
    n = len(loss)
    n_users = int(np.max(user)) + 1 if n_users is None and n else int(n_users or 0)
    spans = [(a, min(n, a + STANDARDISE_CHUNK)) for a in range(0, n, STANDARDISE_CHUNK)]

    def part(a, b):
        l, u = np.asarray(loss[a:b], np.float64), np.asarray(user[a:b], np.int64)
        return l, u, np.isfinite(l)
    cnt, s1 = np.zeros(n_users), np.zeros(n_users)
    for a, b in spans:
        l, u, ok = part(a, b)
        cnt += np.bincount(u[ok], minlength=n_users)
        s1 += np.bincount(u[ok], weights=l[ok], minlength=n_users)
    mean = s1 / np.maximum(cnt, 1)
    ss = np.zeros(n_users)
    for a, b in spans:
        l, u, ok = part(a, b)
        dev = np.where(ok, l - mean[u], 0.0)
        ss += np.bincount(u, weights=dev ** 2, minlength=n_users)
    std_u = np.sqrt(ss / np.maximum(cnt, 1))
    out = np.empty(n, dtype=np.float64)
    for a, b in spans:
        l, u, ok = part(a, b)
        dev = np.where(ok, l - mean[u], 0.0)
        std = std_u[u]
        z = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean[u])), dev / np.where(std > 0, std, 1.0), 0.0)
        out[a:b] = np.where(ok, z, np.nan)
    return out


def _top_by_user(loss: np.ndarray, user: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """Rows among their user's ``quota[user]`` largest losses (ties: the earlier row first)."""
    order = np.lexsort((np.arange(len(loss)), -loss, user))
    u_sorted = user[order]
    start = np.searchsorted(u_sorted, u_sorted, side="left")
    rank = np.arange(len(loss)) - start
    top = np.zeros(len(loss), bool)
    top[order] = rank < quota[u_sorted]
    return top


def loss_overlap(loss: np.ndarray, user: np.ndarray, is_noise: np.ndarray) -> dict:
    """The overlap counts and AUCs of the module doc (rows with a NaN loss are left out)."""
    loss, user = np.asarray(loss, np.float64), np.asarray(user, np.int64)
    noise = np.asarray(is_noise, bool)
    ok = np.isfinite(loss)
    loss, user, noise = loss[ok], user[ok], noise[ok]
    n_noise, normal = int(noise.sum()), ~noise
    out = {"interactions": int(len(loss)), "noise": n_noise, "normal": int(normal.sum()),
           "users_with_noise": int(len(np.unique(user[noise])))}
    if n_noise == 0 or normal.sum() == 0:
        return out
    n_users = int(user.max()) + 1
    # range overlap
    lo, hi = loss[normal].min(), loss[normal].max()
    g_range = noise & (loss >= lo) & (loss <= hi)
    ulo = np.full(n_users, np.inf)
    uhi = np.full(n_users, -np.inf)
    np.minimum.at(ulo, user[normal], loss[normal])
    np.maximum.at(uhi, user[normal], loss[normal])
    p_range = noise & (loss >= ulo[user]) & (loss <= uhi[user])
    # threshold overlap at the true counts
    order = np.lexsort((np.arange(len(loss)), -loss))
    g_top = np.zeros(len(loss), bool)
    g_top[order[:n_noise]] = True
    quota = np.bincount(user[noise], minlength=n_users)
    p_top = _top_by_user(loss, user, quota)
    z = standardise_within_user(loss, user, n_users)
    out.update({
        "range_overlap_global": int(g_range.sum()), "range_overlap_personal": int(p_range.sum()),
        "threshold_overlap_global": int((noise & ~g_top).sum()),
        "threshold_overlap_personal": int((noise & ~p_top).sum()),
        "auc_global_loss": noise_detection(-loss, noise)["auc"],
        "auc_personal_z": noise_detection(-z, noise)["auc"],
    })
    for key in ("range_overlap_global", "range_overlap_personal", "threshold_overlap_global",
                "threshold_overlap_personal"):
        out[key + "_fraction"] = out[key] / n_noise
    return out
