"""Why these values: Shapley explanations of any data value through a surrogate model (Ray-free).

The item-valuation paper (seed 001) explains values with Shapley values of a surrogate. Here a
valuation's per-interaction values ``y`` are regressed on a few interpretable interaction
features ``x`` (:func:`interaction_features`) by a surrogate ``f`` (``linear``, a small torch
``mlp``, or ``gbdt``: scikit-learn gradient-boosted trees, the ``explain`` extra), and ``f``
is explained by interventional Shapley values with a background sample ``B``:

    v_x(S) = (1/|B|) sum_{b in B} f(x_S, b_{N \\ S})
    phi_j(x) = sum_{S ⊆ N \\ {j}} |S|! (d - |S| - 1)! / d! (v_x(S ∪ {j}) - v_x(S))

so ``sum_j phi_j(x) = f(x) - E_B f`` exactly (efficiency; ``E_B f`` is the base value). Backend
``exact`` enumerates all ``2^d`` coalitions for every explained row at once (torch, ``d <=``
:data:`MAX_EXACT_FEATURES`), reusing the coalition weights of :mod:`recval_ray.core.shapley.exact`;
backend ``shap`` hands the tree surrogate to ``shap.TreeExplainer`` (interventional, the same
background), which computes the same quantity in polynomial time. For a linear surrogate
``phi_j = w_j (x_j - mean_B x_j)``.

An explanation is only as good as the surrogate: its R^2 on held-out interactions (rows not used
to fit it) is reported next to every attribution. Global importance of feature ``j`` is the
mean ``|phi_j|`` over the explained rows; dependence data are ``(x_j, phi_j)`` pairs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .data import Dataset, Interactions, Split

FEATURES = ("user_activity", "item_popularity", "rating", "rating_deviation", "recency", "genre_match")
MAX_EXACT_FEATURES = 12
_CHUNK_ELEMENTS = 4_000_000     # rows x coalitions x background x features per enumeration chunk


@dataclass
class ExplainConfig:
    """The ``explain:`` section: explain the valuation's values after valuing.

    ``features``: ``auto`` (every one of :data:`FEATURES` the data allow) or a list of them.
    ``surrogate``: ``mlp`` (torch, ``hidden`` units x 2 layers, ``steps`` Adam steps), ``linear``
    (least squares) or ``gbdt`` (scikit-learn ``GradientBoostingRegressor``, ``trees`` of depth
    ``depth``; needs the ``explain`` extra). ``backend``: ``exact`` (enumeration, any surrogate)
    or ``shap`` (``shap.TreeExplainer``; surrogate ``gbdt``). ``background``: rows of the
    background sample; ``max_rows``: rows explained (a seeded sample; 0 = all); ``fit_rows``: rows
    the surrogate is fitted on (seeded sample of the non-held-out rows; 0 = all); ``holdout``:
    fraction of rows held out for the surrogate's R^2; ``top_features``: dependence plots.
    """
    enabled: bool = False
    features: Union[Literal["auto"], list[str]] = "auto"
    surrogate: Literal["mlp", "linear", "gbdt"] = "mlp"
    backend: Literal["exact", "shap"] = "exact"
    background: int = 100
    max_rows: int = 2000
    fit_rows: int = 30000
    holdout: float = 0.2
    hidden: int = 32
    steps: int = 2000
    lr: float = 3e-3
    batch_size: int = 1024
    trees: int = 100
    depth: int = 4
    top_features: int = 3
    dependence_points: int = 2000
    seed: int = 0

    def validate(self, key: str = "explain") -> None:
        if self.features != "auto":
            bad = [f for f in self.features if f not in FEATURES]
            if bad or not self.features:
                raise ValueError(f"{key}.features: {bad or '[]'} not among {', '.join(FEATURES)} (or 'auto')")
            if len(set(self.features)) != len(self.features):
                raise ValueError(f"{key}.features: a feature is listed twice")
        for name in ("background", "hidden", "steps", "batch_size", "trees", "depth", "top_features",
                     "dependence_points"):
            if getattr(self, name) < 1:
                raise ValueError(f"{key}.{name}: {getattr(self, name)} must be >= 1")
        for name in ("max_rows", "fit_rows"):
            if getattr(self, name) < 0:
                raise ValueError(f"{key}.{name}: {getattr(self, name)} must be >= 0 (0 = all)")
        if not 0 < self.holdout < 1:
            raise ValueError(f"{key}.holdout: {self.holdout} must be in (0, 1)")
        if self.lr <= 0:
            raise ValueError(f"{key}.lr: {self.lr} must be positive")
        if self.backend == "shap" and self.surrogate != "gbdt":
            raise ValueError(f"{key}.backend: shap explains tree surrogates (TreeExplainer): set "
                             f"{key}.surrogate: gbdt, or use backend exact")
        if self.enabled:
            import importlib.util
            need = (["sklearn"] if self.surrogate == "gbdt" else []) + (["shap"] if self.backend == "shap" else [])
            missing = [m for m in need if importlib.util.find_spec(m) is None]
            if missing:
                raise ValueError(f"{key}: surrogate {self.surrogate} / backend {self.backend} need "
                                 f"{' and '.join(missing)}: pip install 'recval_ray[explain]'")


# ---------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------
@dataclass
class FeatureTable:
    """``X[n, d]`` (float64) over the rows of ``train``; ``dropped``: feature -> why it is
    missing; ``imputed``: feature -> rows without the raw field (e.g. injected noise)."""
    names: list
    X: np.ndarray
    dropped: dict = field(default_factory=dict)
    imputed: dict = field(default_factory=dict)


def _user_mean(user: np.ndarray, x: np.ndarray, ok: np.ndarray, n_users: int) -> np.ndarray:
    """Per-user mean of ``x`` over rows ``ok`` (users without such rows: the global mean)."""
    cnt = np.bincount(user[ok], minlength=n_users)
    tot = np.bincount(user[ok], weights=x[ok], minlength=n_users)
    glob = float(x[ok].mean())
    return np.where(cnt > 0, tot / np.maximum(cnt, 1), glob)


def within_user_recency(user: np.ndarray, ts: np.ndarray, n_users: int) -> np.ndarray:
    """The rank of each row's timestamp among its user's rows, scaled to [0, 1] (0 = the
    user's oldest, 1 = newest; ties share their average rank; a user with one row: 0.5).
    Rows with ``ts < 0`` (no timestamp) are left out of the ranking and get 0.5."""
    out = np.full(len(user), 0.5)
    idx = np.flatnonzero(ts >= 0)
    if idx.size == 0:
        return out
    order = np.lexsort((ts[idx], user[idx]))
    su, st = user[idx][order], ts[idx][order]
    m = np.bincount(su, minlength=n_users)
    start = np.cumsum(m) - m
    ordinal = np.arange(len(su)) - start[su]
    grp = np.cumsum(np.r_[True, (su[1:] != su[:-1]) | (st[1:] != st[:-1])]) - 1
    avg = np.bincount(grp, weights=ordinal) / np.bincount(grp)
    mu = m[su]
    out[idx[order]] = np.where(mu > 1, avg[grp] / np.maximum(mu - 1, 1), 0.5)
    return out


def leave_one_out_genre_match(train: Interactions, genres: np.ndarray) -> np.ndarray:
    """``cos(P_u - g_i, g_i)`` for each training row (u, i): ``g_i`` the item's 0/1 genre vector,
    ``P_u = sum_{j in train_u} g_j`` the user's genre profile (counts) without this row; 0 when
    either vector is zero. 1: the user's other interactions are all in exactly this item's
    genres; 0: none shares a genre with it."""
    g = np.asarray(genres, dtype=np.float64)
    prof = train.csr().astype(np.float64) @ g                 # [n_users, G]
    gi = g[train.item]
    p = prof[train.user] - gi
    dot = (p * gi).sum(1)
    norm = np.linalg.norm(p, axis=1) * np.linalg.norm(gi, axis=1)
    return np.where(norm > 0, dot / np.where(norm > 0, norm, 1.0), 0.0)


def interaction_features(train: Interactions, dataset: Optional[Dataset] = None,
                         names: Union[str, list] = "auto") -> FeatureTable:
    """Interpretable features of every training interaction (u, i), vectorised:

    * ``user_activity`` = ln |train_u|, ``item_popularity`` = ln |train^i| (training counts,
      injected noise included: what the model saw);
    * ``rating`` = r_ui, ``rating_deviation`` = r_ui - mean of u's training ratings (rows
      without a rating, e.g. injected noise, get the user's mean: deviation 0);
    * ``recency``: :func:`within_user_recency` of the timestamps (no timestamp: 0.5);
    * ``genre_match``: :func:`leave_one_out_genre_match` with ``dataset.item_genres``.

    A feature the data lack (no ratings, timestamps or genres) or that is constant is dropped
    and listed in ``dropped`` with the reason.
    """
    wanted = list(FEATURES) if names == "auto" else list(names)
    n = len(train)
    cols: dict = {}
    dropped: dict = {}
    imputed: dict = {}
    counts_u, counts_i = train.user_counts(), train.item_counts()
    cols["user_activity"] = np.log(np.maximum(counts_u[train.user], 1)).astype(np.float64)
    cols["item_popularity"] = np.log(np.maximum(counts_i[train.item], 1)).astype(np.float64)
    r = None if train.rating is None else np.asarray(train.rating, np.float64)
    if r is None or not np.isfinite(r).any():
        dropped["rating"] = dropped["rating_deviation"] = "no ratings"
    else:
        ok = np.isfinite(r)
        mu = _user_mean(train.user, np.where(ok, r, 0.0), ok, train.n_users)[train.user]
        cols["rating"] = np.where(ok, r, mu)
        cols["rating_deviation"] = np.where(ok, r - mu, 0.0)
        if (~ok).any():
            imputed["rating"] = imputed["rating_deviation"] = int((~ok).sum())
    ts = train.timestamp
    if ts is None or not (np.asarray(ts) >= 0).any():
        dropped["recency"] = "no timestamps"
    else:
        ts = np.asarray(ts, np.int64)
        cols["recency"] = within_user_recency(train.user, ts, train.n_users)
        if (ts < 0).any():
            imputed["recency"] = int((ts < 0).sum())
    genres = getattr(dataset, "item_genres", None) if dataset is not None else None
    if genres is None:
        dropped["genre_match"] = "no item genres (MovieLens u.item / movies.dat)"
    else:
        cols["genre_match"] = leave_one_out_genre_match(train, genres)
    keep = []
    for name in wanted:
        if name in dropped:
            continue
        x = cols[name]
        if n == 0 or np.ptp(x) == 0:
            dropped[name] = "constant"
        else:
            keep.append(name)
    X = np.stack([cols[k] for k in keep], axis=1) if keep else np.zeros((n, 0))
    return FeatureTable(keep, X, {k: v for k, v in dropped.items() if k in wanted},
                        {k: v for k, v in imputed.items() if k in keep})


# ---------------------------------------------------------------------------------------
# surrogates: predict(X float64 [m, d]) -> float64 [m], in the values' units
# ---------------------------------------------------------------------------------------
class LinearSurrogate:
    """Least squares ``f(x) = w . x + b``."""
    kind = "linear"

    def __init__(self, X: np.ndarray, y: np.ndarray):
        A = np.c_[X, np.ones(len(X))]
        coef, *_ = np.linalg.lstsq(A, y, rcond=None)
        self.w, self.b = coef[:-1], float(coef[-1])

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, np.float64) @ self.w + self.b


class MLPSurrogate:
    """``f(x) = mu_y + sd_y * net((x - mu_x) / sd_x)``, ``net`` = 2 hidden SiLU layers of
    ``hidden`` units, fitted by Adam on the mean squared error (seeded init and batches)."""
    kind = "mlp"

    def __init__(self, X: np.ndarray, y: np.ndarray, cfg: ExplainConfig):
        import torch
        from torch import nn

        gen = torch.Generator().manual_seed(int(cfg.seed))
        self.mu_x, self.sd_x = X.mean(0), np.where(X.std(0) > 0, X.std(0), 1.0)
        self.mu_y, self.sd_y = float(y.mean()), float(y.std()) or 1.0
        Xt = torch.as_tensor((X - self.mu_x) / self.sd_x, dtype=torch.float32)
        yt = torch.as_tensor((y - self.mu_y) / self.sd_y, dtype=torch.float32)
        d, h = X.shape[1], int(cfg.hidden)
        layers = [nn.Linear(d, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(), nn.Linear(h, 1)]
        with torch.no_grad():
            for lay in layers:
                if isinstance(lay, nn.Linear):
                    bound = 1.0 / math.sqrt(lay.in_features)
                    lay.weight.uniform_(-bound, bound, generator=gen)
                    lay.bias.uniform_(-bound, bound, generator=gen)
        self.net = nn.Sequential(*layers)
        opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.steps))
        bs = min(int(cfg.batch_size), len(Xt))
        for _ in range(int(cfg.steps)):
            idx = torch.randint(len(Xt), (bs,), generator=gen)
            loss = torch.mean((self.net(Xt[idx]).squeeze(1) - yt[idx]) ** 2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        self.net.eval()

    def predict(self, X: np.ndarray) -> np.ndarray:
        import torch
        with torch.no_grad():
            z = torch.as_tensor((np.asarray(X, np.float64) - self.mu_x) / self.sd_x, dtype=torch.float32)
            out = torch.cat([self.net(z[k:k + 262144]).squeeze(1) for k in range(0, len(z), 262144)]) \
                if len(z) else torch.zeros(0)
        return out.double().numpy() * self.sd_y + self.mu_y


class GBDTSurrogate:
    """scikit-learn ``GradientBoostingRegressor`` (``trees`` of depth ``depth``, learning rate
    0.1, row subsample 0.8, seeded): the tree model ``shap.TreeExplainer`` reads exactly."""
    kind = "gbdt"

    def __init__(self, X: np.ndarray, y: np.ndarray, cfg: ExplainConfig):
        from sklearn.ensemble import GradientBoostingRegressor
        self.model = GradientBoostingRegressor(n_estimators=int(cfg.trees), max_depth=int(cfg.depth),
                                               learning_rate=0.1, subsample=0.8, random_state=int(cfg.seed))
        self.model.fit(X, y)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.model.predict(np.asarray(X, np.float64)).astype(np.float64)


def fit_surrogate(X: np.ndarray, y: np.ndarray, cfg: ExplainConfig):
    if cfg.surrogate == "linear":
        return LinearSurrogate(X, y)
    if cfg.surrogate == "mlp":
        return MLPSurrogate(X, y, cfg)
    return GBDTSurrogate(X, y, cfg)


def r2_score(y: np.ndarray, pred: np.ndarray) -> float:
    """1 - sum (y - pred)^2 / sum (y - mean y)^2 (NaN with fewer than 2 rows or constant y)."""
    if len(y) < 2:
        return float("nan")
    ss = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else float("nan")


# ---------------------------------------------------------------------------------------
# Shapley values of the surrogate
# ---------------------------------------------------------------------------------------
def interventional_shapley(predict, X: np.ndarray, background: np.ndarray,
                           max_features: int = MAX_EXACT_FEATURES) -> tuple[np.ndarray, float, np.ndarray]:
    """Exact interventional Shapley values of ``predict`` at every row of ``X`` by enumerating
    the ``2^d`` coalitions: ``(phi [n, d], base = E_B f, f(x) [n])``.

    With the coalitions as 0/1 rows ``M [2^d, d]`` and ``V [n, 2^d]`` (``V[x, S] = v_x(S)``),
    ``phi = V @ (M * w_in(|S|) - (1 - M) * w_out(|S|))`` (the weights of
    :func:`recval_ray.core.shapley.exact.shapley_weights`); the composite inputs
    ``x_S ∪ b_{N \\ S}`` of a chunk of rows go through ``predict`` in one call.
    """
    import torch

    from .shapley.exact import coalition_masks, shapley_weights

    X = np.asarray(X, np.float64)
    bg = torch.as_tensor(np.asarray(background, np.float64))
    n, d = X.shape
    if d > max_features:
        raise ValueError(f"exact enumeration is limited to {max_features} features, got {d}")
    if d == 0:
        base = float(np.mean(predict(np.asarray(background, np.float64)))) if len(bg) else float("nan")
        return np.zeros((n, 0)), base, np.full(n, base)
    masks = coalition_masks(d, 0, 2 ** d)                       # [C, d] bool; row 0 = {}, last = N
    w_in, w_out = shapley_weights(d)
    size = masks.sum(1)
    W = masks.double() * w_in[size][:, None] - (~masks).double() * w_out[size][:, None]   # [C, d]
    C, B = masks.shape[0], bg.shape[0]
    chunk = max(1, _CHUNK_ELEMENTS // (C * B * d))
    phi = np.zeros((n, d))
    fx = np.zeros(n)
    base = float("nan")
    for s in range(0, n, chunk):
        x = torch.as_tensor(X[s:s + chunk])
        z = torch.where(masks[None, :, None, :], x[:, None, None, :], bg[None, None, :, :])   # [m, C, B, d]
        v = torch.as_tensor(predict(z.reshape(-1, d).numpy())).reshape(len(x), C, B).mean(2)  # [m, C]
        phi[s:s + chunk] = (v @ W).numpy()
        fx[s:s + chunk] = v[:, -1].numpy()
        base = float(v[0, 0])
    return phi, base, fx


def tree_shap(surrogate: GBDTSurrogate, X: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """``shap.TreeExplainer`` (interventional, background ``background``) of the tree surrogate:
    ``(phi, base, f(x))`` as :func:`interventional_shapley`."""
    import shap

    ex = shap.TreeExplainer(surrogate.model, data=np.asarray(background, np.float64),
                            feature_perturbation="interventional")
    phi = np.asarray(ex.shap_values(np.asarray(X, np.float64), check_additivity=True), np.float64)
    base = float(np.ravel(ex.expected_value)[0])
    return phi.reshape(len(X), -1), base, surrogate.predict(X)


# ---------------------------------------------------------------------------------------
# the explanation
# ---------------------------------------------------------------------------------------
@dataclass
class Explanation:
    """Attributions of the explained training rows ``rows`` (indices into ``split.train``)."""
    features: list
    rows: np.ndarray
    X: np.ndarray
    values: np.ndarray
    phi: np.ndarray
    prediction: np.ndarray
    base_value: float
    info: dict
    dropped: dict = field(default_factory=dict)
    holdout_true: np.ndarray = field(default_factory=lambda: np.zeros(0))
    holdout_pred: np.ndarray = field(default_factory=lambda: np.zeros(0))
    is_noise: Optional[np.ndarray] = None

    def importance(self) -> list[dict]:
        """Per feature, sorted by ``mean_abs_phi``: mean |phi_j|, its share of the total, mean
        phi_j, and the Pearson correlation of x_j with phi_j (the sign of the effect)."""
        if not self.features:
            return []
        a = np.abs(self.phi).mean(0)
        tot = float(a.sum())
        rows = []
        for j, name in enumerate(self.features):
            x, p = self.X[:, j], self.phi[:, j]
            corr = float(np.corrcoef(x, p)[0, 1]) if len(x) > 1 and np.ptp(x) > 0 and np.ptp(p) > 0 else float("nan")
            rows.append({"feature": name, "mean_abs_phi": float(a[j]), "share": float(a[j] / tot) if tot > 0 else float("nan"),
                         "mean_phi": float(p.mean()), "corr_x_phi": corr})
        return sorted(rows, key=lambda r: -r["mean_abs_phi"])

    def top_features(self, k: int) -> list[str]:
        return [r["feature"] for r in self.importance()[:k]]

    def attributions_table(self, dataset: Dataset, train: Interactions) -> pa.Table:
        """user_id, item_id, value, prediction, phi_<feature>..., x_<feature>... (+ is_noise)."""
        cols = {"user_id": dataset.original_users(train.user[self.rows]),
                "item_id": dataset.original_items(train.item[self.rows]),
                "value": pa.array(self.values, pa.float64()),
                "prediction": pa.array(self.prediction, pa.float64())}
        for j, name in enumerate(self.features):
            cols[f"phi_{name}"] = pa.array(self.phi[:, j], pa.float64())
        for j, name in enumerate(self.features):
            cols[f"x_{name}"] = pa.array(self.X[:, j], pa.float64())
        if self.is_noise is not None:
            cols["is_noise"] = pa.array(self.is_noise)
        return pa.table(cols)

    def importance_table(self) -> pa.Table:
        imp = self.importance()
        keys = ["feature", "mean_abs_phi", "share", "mean_phi", "corr_x_phi"]
        return pa.table({k: [r[k] for r in imp] for k in keys},
                        schema=pa.schema([("feature", pa.string())] + [(k, pa.float64()) for k in keys[1:]]))

    def summary(self) -> dict:
        """For metrics.json: settings, surrogate fit, base value, global importance."""
        return self.info | {"features": list(self.features), "dropped_features": dict(self.dropped),
                            "base_value": self.base_value, "importance": self.importance()}


def align_values(values_table: pa.Table, train: Interactions, dataset: Dataset) -> np.ndarray:
    """The ``value`` column of ``values_table`` (rows keyed by original ``user_id``, ``item_id``)
    placed on the rows of ``train`` (NaN where the table has no row)."""
    def codes(col: str, ids: pa.Array) -> np.ndarray:
        c = values_table[col].combine_chunks()
        if c.type != ids.type:
            c = c.cast(ids.type)
        return pc.index_in(c, value_set=ids).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)

    u, i = codes("user_id", dataset.user_ids), codes("item_id", dataset.item_ids)
    bad = (u < 0) | (i < 0)
    keys = train.pair_keys()
    order = np.argsort(keys, kind="stable")
    q = u * np.int64(train.n_items) + i
    if len(keys) == 0:
        raise ValueError("explain: the split has no training interactions")
    pos = np.minimum(np.searchsorted(keys[order], q), len(keys) - 1)
    found = ~bad & (keys[order][pos] == q)
    if not found.all():
        k = int(np.flatnonzero(~found)[0])
        raise ValueError(f"explain: {int((~found).sum())} rows of the values table are not training "
                         f"interactions of the split (e.g. row {k}: user "
                         f"{values_table['user_id'][k].as_py()!r}, item {values_table['item_id'][k].as_py()!r})")
    out = np.full(len(train), np.nan)
    out[order[pos]] = values_table["value"].combine_chunks().to_numpy(zero_copy_only=False).astype(np.float64)
    return out


def explain_values(values_table: pa.Table, split: Union[Split, Interactions], dataset: Dataset,
                   cfg: ExplainConfig) -> Explanation:
    """Explain the ``value`` column of a valued table (the run's ``values/``, this run's or an
    earlier run's read back) over the training interactions of ``split``."""
    train = split.train if isinstance(split, Split) else split
    values = align_values(values_table, train, dataset)
    return explain_array(values, train, dataset, cfg)


def explain_array(values: np.ndarray, train: Interactions, dataset: Optional[Dataset],
                  cfg: ExplainConfig) -> Explanation:
    """Features of ``train``, surrogate fitted on ``values`` (aligned with ``train``; NaN rows
    left out), its held-out R^2, and Shapley attributions of a seeded sample of rows."""
    import time

    t0 = time.perf_counter()
    ft = interaction_features(train, dataset, cfg.features)
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng(int(cfg.seed))
    ok = np.flatnonzero(np.isfinite(values))
    if len(ok) < 10:
        raise ValueError(f"explain: {len(ok)} finite values, too few to fit a surrogate")
    perm = rng.permutation(ok)
    n_hold = max(1, int(round(cfg.holdout * len(ok))))
    hold, fit = np.sort(perm[:n_hold]), perm[n_hold:]
    if cfg.fit_rows and len(fit) > cfg.fit_rows:
        fit = fit[:cfg.fit_rows]
    fit = np.sort(fit)
    X, y = ft.X, values
    sur = fit_surrogate(X[fit], y[fit], cfg)
    t_fit = time.perf_counter() - t0
    pred_hold = sur.predict(X[hold])
    r2_hold, r2_fit = r2_score(y[hold], pred_hold), r2_score(y[fit], sur.predict(X[fit]))
    bg = np.sort(rng.choice(fit, size=min(int(cfg.background), len(fit)), replace=False))
    rows = ok if not cfg.max_rows or len(ok) <= cfg.max_rows else \
        np.sort(rng.choice(ok, size=int(cfg.max_rows), replace=False))
    t1 = time.perf_counter()
    if cfg.backend == "shap":
        phi, base, fx = tree_shap(sur, X[rows], X[bg])
    else:
        phi, base, fx = interventional_shapley(sur.predict, X[rows], X[bg])
    t_shap = time.perf_counter() - t1
    info = {"surrogate": cfg.surrogate, "backend": cfg.backend, "r2_heldout": r2_hold, "r2_fit": r2_fit,
            "rows_valued": int(len(ok)), "rows_fit": int(len(fit)), "rows_heldout": int(len(hold)),
            "rows_explained": int(len(rows)), "background": int(len(bg)), "imputed": dict(ft.imputed),
            "efficiency_max_error": float(np.abs(phi.sum(1) - (fx - base)).max()) if len(rows) else 0.0,
            "fit_seconds": round(t_fit, 3), "shapley_seconds": round(t_shap, 3), "seed": int(cfg.seed),
            "top_features": int(cfg.top_features), "dependence_points": int(cfg.dependence_points)}
    if isinstance(sur, LinearSurrogate):
        info["linear_weights"] = {k: float(w) for k, w in zip(ft.names, sur.w)}
    noise = train.is_noise[rows] if train.is_noise is not None else None
    return Explanation(features=list(ft.names), rows=rows, X=X[rows], values=y[rows], phi=phi, prediction=fx,
                       base_value=base, info=info, dropped=ft.dropped, holdout_true=y[hold],
                       holdout_pred=pred_hold, is_noise=noise)
