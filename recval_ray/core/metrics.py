"""Ranking and rating metrics: vectorised torch implementation plus a plain reference loop.

Ray-free. Binary relevance. For a user ``u`` with test set ``T_u`` (``n_u = |T_u|``
distinct items) the *ranking* is every item sorted by score, descending, after removing
the user's excluded items (training + validation items, passed in) and any item the model
scored ``-inf``. Ties are broken by **lower item index first** (a stable descending sort
of the scores). ``h_i`` is 1 when the item at rank ``i`` is in ``T_u``.

=================  ==========================================================================
``precision@K``    ``sum_{i<=K} h_i / K``
``recall@K``       ``sum_{i<=K} h_i / n_u`` (``recall_variant="test"``) or
                   ``/ min(K, n_u)`` (``"min-k"``, Mult-VAE)
``ndcg@K``         ``DCG / IDCG``, ``DCG = sum_{i<=K} h_i / log2(i + 1)``; IDCG sums
                   ``1 / log2(i + 1)`` over ``i <= min(K, n_u)`` (``ndcg_variant="truncated"``,
                   RecBole/LightGCN) or over ``i <= n_u`` (``"untruncated"``, PLD code)
``hit@K``          ``1`` if ``sum_{i<=K} h_i > 0``
``mrr@K``          ``1 / rank`` of the first hit within the top K, 0 if none (RecBole)
``map@K``          ``sum_{i<=K} h_i * precision@i / min(K, n_u)`` (RecBole)
``mrr``            ``1 / rank`` of the first test item in the full ranking
``map``            full-ranking average precision: ``sum_i h_i * precision@i / n_u``
=================  ==========================================================================

A test item that is also excluded never appears in the ranking (so it is never a hit) but
still counts in ``n_u``. Ranks past the end of the ranking (``K`` larger than the number of
ranked items) are misses; ``precision@K`` still divides by ``K``. Users are averaged over
``users="nonempty"`` (``n_u > 0``), ``"all"`` (users with no test items score 0) or an
explicit array of user indices. Scores must not be NaN.

Metric names: ``parse_metric`` parses one output name (``"ndcg@20"``, or ``"map"`` /
``"mrr"`` for the full-ranking variants); ``metric_names`` expands metric *specs* against
``ks``: a bare name (``"recall"``) becomes ``recall@k`` for every ``k``, a name with ``@``
is kept, and ``"map_full"`` / ``"mrr_full"`` request the full-ranking ``"map"`` / ``"mrr"``.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence, Union

import numpy as np
import scipy.sparse as sp
import torch

from recval_ray.core.data import Interactions

RANKING_METRICS = ("precision", "recall", "ndcg", "hit", "mrr", "map")
FULL_RANKING_METRICS = ("map", "mrr")          # the ones that also exist without @K
_FULL_ALIASES = {"map_full": "map", "mrr_full": "mrr"}
NDCG_VARIANTS = ("truncated", "untruncated")
RECALL_VARIANTS = ("test", "min-k")

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
UsersArg = Union[str, Sequence[int], np.ndarray]

# Working memory of one batch of ``ranking_metrics``, per (user, item) cell: the scores and
# their excluded copy (2 x 4 B), the test mask (1 B), then the larger of the top-K selection
# (ties: a bool mask, an int64 running count and two more masks) and the full-ranking sort
# (sorted float32 values, int64 order, three bool masks): about 25 B, rounded up.
BYTES_PER_CELL = 32
MAX_BATCH_BYTES = 64 << 20     # default bound on a batch's working memory (64 MiB: 1024 users up to 2k items, 94 at 22k)


# ----------------------------------------------------------------------------- names
def parse_metric(name: str) -> tuple[str, int | None]:
    """``"ndcg@20" -> ("ndcg", 20)``; ``"map"`` / ``"map_full" -> ("map", None)``.

    Raises ``ValueError`` for an unknown metric, a bad ``K`` or ``@K`` missing on a metric
    that has no full-ranking variant.
    """
    if not isinstance(name, str):
        raise ValueError(f"metric name must be a string, got {name!r}")
    s = name.strip().lower()
    if s in _FULL_ALIASES:
        return _FULL_ALIASES[s], None
    base, at, k = s.partition("@")
    if base not in RANKING_METRICS:
        raise ValueError(f"unknown ranking metric {name!r}; known: {', '.join(RANKING_METRICS)}")
    if not at:
        if base in FULL_RANKING_METRICS:
            return base, None
        raise ValueError(f"metric {name!r} needs a cut-off, e.g. {base}@20")
    try:
        kv = int(k)
    except ValueError:
        raise ValueError(f"bad cut-off in metric {name!r}") from None
    if kv < 1 or str(kv) != k.strip():
        raise ValueError(f"cut-off must be a positive integer in metric {name!r}")
    return base, kv


def _format(base: str, k: int | None) -> str:
    return base if k is None else f"{base}@{k}"


def metric_names(metrics: Iterable[str], ks: Iterable[int]) -> list[str]:
    """Expand metric specs into canonical output names (order kept, duplicates dropped).

    ``["recall", "map"], [10, 20] -> ["recall@10", "recall@20", "map@10", "map@20"]``;
    ``"ndcg@5"`` stays as is; ``"map_full"`` / ``"mrr_full"`` become the full-ranking
    ``"map"`` / ``"mrr"`` (a bare ``"map"`` here means ``map@k`` for each ``k``).
    """
    if isinstance(metrics, str):
        metrics = [metrics]
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"cut-offs must be positive, got {ks}")
    out: list[str] = []
    for spec in metrics:
        s = str(spec).strip().lower()
        if "@" in s or s in _FULL_ALIASES:
            names = [_format(*parse_metric(s))]
        elif s in RANKING_METRICS:
            if not ks:
                raise ValueError(f"metric {spec!r} has no cut-off and ks is empty")
            names = [f"{s}@{k}" for k in ks]
        else:
            raise ValueError(f"unknown ranking metric {spec!r}; known: {', '.join(RANKING_METRICS)}"
                             " (+ map_full, mrr_full)")
        out.extend(n for n in names if n not in out)
    return out


# ----------------------------------------------------------------------------- helpers
def scores_fn_from_matrix(S: torch.Tensor) -> ScoreFn:
    """A ``score_fn`` reading rows of a full ``n_users x n_items`` score matrix."""
    S = torch.as_tensor(S)

    def score_fn(users: torch.Tensor) -> torch.Tensor:
        return S[users.to(S.device)].to(users.device)

    return score_fn


def _resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _as_list(exclude) -> list[Interactions]:
    if exclude is None:
        return []
    if isinstance(exclude, Interactions):
        return [exclude]
    return list(exclude)


def _check_spaces(test: Interactions, exclude: list[Interactions]) -> None:
    for e in exclude:
        if (e.n_users, e.n_items) != (test.n_users, test.n_items):
            raise ValueError("exclude interactions are over a different index space than test")
    if test.n_items < 1:
        raise ValueError("no items to rank")


def _exclusion_csr(test: Interactions, exclude: list[Interactions],
                   only: np.ndarray | None = None) -> sp.csr_matrix:
    """Excluded (user, item) pairs as a CSR matrix; ``only``: a bool mask over users, the
    rows of other users left out (a sample of users never copies the whole training set)."""
    parts = [e if only is None else e.only(()).take(only[e.user]) for e in exclude]   # ids only
    users = np.concatenate([e.user for e in parts]) if parts else np.zeros(0, np.int64)
    items = np.concatenate([e.item for e in parts]) if parts else np.zeros(0, np.int64)
    m = sp.csr_matrix((np.ones(len(users), np.float32), (users, items)),
                      shape=(test.n_users, test.n_items))
    m.sum_duplicates()
    return m


def batch_size_for(n_items: int, batch_users: int = 1024,
                   max_batch_bytes: int | None = MAX_BATCH_BYTES) -> int:
    """Users per batch of :func:`ranking_metrics`: ``batch_users``, lowered so that a batch's
    working memory (about ``BYTES_PER_CELL`` bytes per user x item) stays within
    ``max_batch_bytes`` (None: no bound); at least 1."""
    bs = max(1, int(batch_users))
    if max_batch_bytes is not None and max_batch_bytes > 0:
        bs = min(bs, max(1, int(max_batch_bytes) // (BYTES_PER_CELL * max(1, int(n_items)))))
    return bs


def _eval_users(test: Interactions, n_test: np.ndarray | None, users: UsersArg) -> np.ndarray:
    if isinstance(users, str):
        if users == "nonempty":
            return np.flatnonzero(n_test > 0)
        if users == "all":
            return np.arange(test.n_users, dtype=np.int64)
        raise ValueError(f"users must be 'nonempty', 'all' or an index array, got {users!r}")
    u = np.asarray(users, dtype=np.int64).ravel()
    if len(u) and (u.min() < 0 or u.max() >= test.n_users):
        raise ValueError("user index out of range")
    return u


def _users_and_rows(test: Interactions, exclude: list[Interactions], users: UsersArg):
    """``(evaluated users, test CSR, excluded CSR)``; with explicit users (a sample) only
    their rows are indexed."""
    if isinstance(users, str):
        test_csr = test.csr()
        return _eval_users(test, np.diff(test_csr.indptr), users), test_csr, _exclusion_csr(test, exclude)
    eval_users = _eval_users(test, None, users)
    only = np.zeros(test.n_users, dtype=bool)
    only[eval_users] = True
    return eval_users, test.only(()).take(only[test.user]).csr(), _exclusion_csr(test, exclude, only)


def _check_options(ndcg_variant: str, recall_variant: str) -> None:
    if ndcg_variant not in NDCG_VARIANTS:
        raise ValueError(f"ndcg_variant must be one of {NDCG_VARIANTS}, got {ndcg_variant!r}")
    if recall_variant not in RECALL_VARIANTS:
        raise ValueError(f"recall_variant must be one of {RECALL_VARIANTS}, got {recall_variant!r}")


class _CSRRows:
    """A CSR matrix's structure on ``device``; rows come back as coordinates or dense masks."""

    def __init__(self, m: sp.csr_matrix, device: torch.device):
        self.n_cols = m.shape[1]
        self.indptr = torch.as_tensor(m.indptr.astype(np.int64), device=device)
        self.indices = torch.as_tensor(m.indices.astype(np.int64), device=device)

    def counts(self, rows: torch.Tensor) -> torch.Tensor:
        return self.indptr[rows + 1] - self.indptr[rows]

    def coords(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch row, column) of every stored entry of ``rows``, without a per-row loop."""
        start = self.indptr[rows]
        cnt = self.indptr[rows + 1] - start
        total = int(cnt.sum())
        r = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), cnt,
                                    output_size=total)
        off = torch.arange(total, device=rows.device) - (cnt.cumsum(0) - cnt)[r] + start[r]
        return r, self.indices[off]

    def dense(self, rows: torch.Tensor) -> torch.Tensor:
        """``B x n_cols`` bool mask of the stored entries of ``rows``."""
        mask = torch.zeros(len(rows), self.n_cols, dtype=torch.bool, device=rows.device)
        mask[self.coords(rows)] = True
        return mask


def _topk_stable(S: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the top ``k`` of each row, ordered by (score desc, item index asc).

    ``torch.topk`` leaves ties unspecified; rows whose k-th score is tied past the cut are
    re-selected taking the lowest indices among the tied items, then each row's k
    winners are put in canonical order with a stable sort.
    """
    vals, idx = S.topk(k, dim=1)
    thr = vals[:, -1:]
    ambiguous = (S >= thr).sum(1) > k
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero().squeeze(1)
        Sa, t = S[rows], thr[rows]
        gt, eq = Sa > t, Sa == t
        keep = gt | (eq & (eq.cumsum(1) <= (k - gt.sum(1)).unsqueeze(1)))
        idx[rows] = keep.nonzero()[:, 1].view(-1, k)   # row-major: ascending item index
    idx = idx.sort(dim=1).values
    order = S.gather(1, idx).sort(dim=1, descending=True, stable=True).indices
    return idx.gather(1, order)


# ----------------------------------------------------------------------------- ranking
def ranking_metrics(score_fn: ScoreFn, test: Interactions,
                    exclude: Sequence[Interactions] | Interactions = (), *,
                    metrics: Iterable[str] = ("recall", "ndcg"), ks: Iterable[int] = (20,),
                    ndcg_variant: str = "truncated", recall_variant: str = "test",
                    users: UsersArg = "nonempty", batch_users: int = 1024, device="cpu",
                    per_user: bool = False, max_batch_bytes: int | None = MAX_BATCH_BYTES) -> dict:
    """Mean ranking metrics over users (see the module docstring for the definitions).

    ``score_fn(users: LongTensor[B]) -> Tensor[B, n_items]`` gives scores on ``device``
    (higher is better). Users are scored in batches of ``batch_users``, fewer when a batch
    would need more than ``max_batch_bytes`` of working memory (:func:`batch_size_for`;
    None: no bound): peak memory is O(batch x n_items) plus the CSR structure of the test
    and excluded rows, and no ``n_users x n_items`` array is ever built. With an explicit
    array of ``users`` (a sample), only those users' test and excluded rows are indexed.
    The batch size never changes a user's values. The batch's test
    and exclusion masks are dense ``B x n_items`` booleans built from CSR structure. One
    ``topk`` at the largest K serves every @K metric; a full stable sort of the rows is
    done only when the full-ranking ``"map"`` / ``"mrr"`` are requested. ``score_fn`` runs
    under ``torch.no_grad()``. Returns ``{name: mean}``, or with ``per_user=True``
    ``{name: float64 array over evaluated users, "users": indices}``. Means over zero users
    are NaN.
    """
    _check_options(ndcg_variant, recall_variant)
    exclude = _as_list(exclude)
    _check_spaces(test, exclude)
    names = metric_names(metrics, ks)
    if not names:
        raise ValueError("no metrics requested")
    parsed = [parse_metric(n) for n in names]
    dev = _resolve_device(device)
    n_items = test.n_items

    eval_users, test_csr, excl_csr = _users_and_rows(test, exclude, users)
    test_rows = _CSRRows(test_csr, dev)
    excl_rows = _CSRRows(excl_csr, dev)

    at_k = [k for _, k in parsed if k is not None]
    k_eff = min(max(at_k), n_items) if at_k else 0
    full = any(k is None for _, k in parsed)
    f64 = torch.float64
    # cumulative ideal DCG: idcg_cum[j] = sum_{i<=j+1} 1/log2(i+1)
    idcg_cum = (1.0 / torch.log2(torch.arange(2, n_items + 2, device=dev, dtype=f64))).cumsum(0)

    chunks = []
    bs = batch_size_for(n_items, batch_users, max_batch_bytes)
    for b0 in range(0, len(eval_users), bs):
        u = torch.as_tensor(eval_users[b0:b0 + bs], device=dev)
        with torch.no_grad():
            S = score_fn(u)
        if S.shape != (len(u), n_items):
            raise ValueError(f"score_fn returned shape {tuple(S.shape)}, "
                             f"expected {(len(u), n_items)}")
        S = S.to(dev)
        if not S.is_floating_point():
            S = S.float()
        if bool(torch.isnan(S).any()):
            raise ValueError("score_fn returned NaN scores")
        S = S.index_put(excl_rows.coords(u), torch.tensor(float("-inf"), device=dev,
                                                          dtype=S.dtype))   # out of place
        T = test_rows.dense(u)
        n = test_rows.counts(u)
        if at_k:
            top = _topk_stable(S, k_eff)
            cum = _cumulative_topk(T.gather(1, top) & (S.gather(1, top) > float("-inf")))
        if full:
            ap_full, rr_full = _full_ranking(S, T, n)
        cols = []
        for base, k in parsed:
            if k is None:
                cols.append(ap_full if base == "map" else rr_full)
            else:
                cols.append(_at_k(base, k, cum, n, idcg_cum, ndcg_variant, recall_variant))
        chunks.append(torch.stack(cols, 1).cpu().numpy())

    values = np.concatenate(chunks) if chunks else np.zeros((0, len(names)))
    if per_user:
        out = {name: values[:, j].copy() for j, name in enumerate(names)}
        out["users"] = eval_users
        return out
    means = values.mean(0) if len(values) else np.full(len(names), np.nan)
    return {name: float(means[j]) for j, name in enumerate(names)}


def _cumulative_topk(H: torch.Tensor) -> dict:
    """Running sums over ranks 1..k of hits, DCG, AP numerator and first-hit 1/rank."""
    Hf = H.to(torch.float64)
    pos = torch.arange(1, H.shape[1] + 1, device=H.device, dtype=torch.float64)
    hits = Hf.cumsum(1)
    return {
        "hits": hits,
        "dcg": (Hf / torch.log2(pos + 1)).cumsum(1),
        "ap": (Hf * hits / pos).cumsum(1),
        "rr": (Hf * (hits == 1) / pos).cumsum(1),
    }


def _at_k(base: str, k: int, cum: dict, n: torch.Tensor, idcg_cum: torch.Tensor,
          ndcg_variant: str, recall_variant: str) -> torch.Tensor:
    col = min(k, cum["hits"].shape[1]) - 1
    nf = n.to(torch.float64)
    nk = torch.clamp(n, max=k)
    if base == "precision":
        return cum["hits"][:, col] / k
    if base == "recall":
        den = nf if recall_variant == "test" else nk.to(torch.float64)
        return cum["hits"][:, col] / den.clamp(min=1)
    if base == "hit":
        return (cum["hits"][:, col] > 0).to(torch.float64)
    if base == "mrr":
        return cum["rr"][:, col]
    if base == "map":
        return cum["ap"][:, col] / nk.to(torch.float64).clamp(min=1)
    # ndcg
    m = nk if ndcg_variant == "truncated" else n
    idcg = torch.where(m > 0, idcg_cum[(m - 1).clamp(min=0)], torch.zeros_like(nf))
    return torch.where(m > 0, cum["dcg"][:, col] / idcg.clamp(min=1e-300), torch.zeros_like(nf))


def _full_ranking(S: torch.Tensor, T: torch.Tensor,
                  n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-ranking (AP, 1/rank of the first hit) per row: one stable descending sort of the
    scores, then only the hit positions are touched (``nonzero`` + ``index_add``)."""
    B = S.shape[0]
    vals, order = S.sort(dim=1, descending=True, stable=True)
    H = T.gather(1, order) & (vals > float("-inf"))
    rows, cols = H.nonzero(as_tuple=True)                 # row-major: ranks ascending per row
    cnt = torch.bincount(rows, minlength=B)
    j = torch.arange(len(rows), device=S.device) - (cnt.cumsum(0) - cnt)[rows] + 1
    rank = (cols + 1).to(torch.float64)
    ap = torch.zeros(B, dtype=torch.float64, device=S.device).index_add_(0, rows, j / rank)
    rr = torch.zeros(B, dtype=torch.float64, device=S.device)
    rr[rows[j == 1]] = 1.0 / rank[j == 1]
    return ap / n.to(torch.float64).clamp(min=1), rr


# ----------------------------------------------------------------------------- reference
def ranking_metrics_reference(score_fn: ScoreFn, test: Interactions,
                              exclude: Sequence[Interactions] | Interactions = (), *,
                              metrics: Iterable[str] = ("recall", "ndcg"),
                              ks: Iterable[int] = (20,), ndcg_variant: str = "truncated",
                              recall_variant: str = "test", users: UsersArg = "nonempty",
                              device="cpu", per_user: bool = False) -> dict:
    """Same definitions as :func:`ranking_metrics`, one user at a time in numpy/Python.

    Independent, slow and obvious: for tests and the benchmark only.
    """
    _check_options(ndcg_variant, recall_variant)
    exclude = _as_list(exclude)
    _check_spaces(test, exclude)
    names = metric_names(metrics, ks)
    parsed = [parse_metric(n) for n in names]
    dev = _resolve_device(device)

    test_sets: dict[int, set] = {}
    for u, i in zip(test.user.tolist(), test.item.tolist()):
        test_sets.setdefault(u, set()).add(i)
    excl_sets: dict[int, set] = {}
    for e in exclude:
        for u, i in zip(e.user.tolist(), e.item.tolist()):
            excl_sets.setdefault(u, set()).add(i)
    n_test = np.array([len(test_sets.get(u, ())) for u in range(test.n_users)])
    eval_users = _eval_users(test, n_test, users)

    values = np.zeros((len(eval_users), len(names)))
    for r, u in enumerate(eval_users.tolist()):
        with torch.no_grad():
            scores = score_fn(torch.tensor([u], device=dev))[0].cpu().double().numpy()
        if np.isnan(scores).any():
            raise ValueError("score_fn returned NaN scores")
        T = test_sets.get(u, set())
        X = excl_sets.get(u, set())
        order = np.lexsort((np.arange(len(scores)), -scores))    # score desc, index asc
        ranking = [i for i in order.tolist() if i not in X and scores[i] > -np.inf]
        h = [1 if i in T else 0 for i in ranking]
        n_u = len(T)
        for c, (base, k) in enumerate(parsed):
            values[r, c] = _reference_one(base, k, h, n_u, ndcg_variant, recall_variant)

    if per_user:
        out = {name: values[:, j].copy() for j, name in enumerate(names)}
        out["users"] = eval_users
        return out
    return {name: float(values[:, j].mean()) if len(values) else float("nan")
            for j, name in enumerate(names)}


def _reference_one(base, k, h, n_u, ndcg_variant, recall_variant) -> float:
    if k is None:                                 # full ranking
        if base == "mrr":
            return next((1.0 / (i + 1) for i, x in enumerate(h) if x), 0.0)
        found, total = 0, 0.0                     # average precision over the whole ranking
        for i, x in enumerate(h):
            if x:
                found += 1
                total += found / (i + 1)
        return total / n_u if n_u else 0.0
    top = h[:k]
    n_hits = sum(top)
    if base == "precision":
        return n_hits / k
    if base == "recall":
        den = n_u if recall_variant == "test" else min(k, n_u)
        return n_hits / den if den else 0.0
    if base == "hit":
        return float(n_hits > 0)
    if base == "mrr":
        return next((1.0 / (i + 1) for i, x in enumerate(top) if x), 0.0)
    if base == "map":
        found, total = 0, 0.0
        for i, x in enumerate(top):
            if x:
                found += 1
                total += found / (i + 1)
        return total / min(k, n_u) if n_u else 0.0
    # ndcg
    dcg = sum(x / math.log2(i + 2) for i, x in enumerate(top))
    m = min(k, n_u) if ndcg_variant == "truncated" else n_u
    idcg = sum(1.0 / math.log2(i + 2) for i in range(m))
    return dcg / idcg if idcg > 0 else 0.0


# ----------------------------------------------------------------------------- rating
def rating_metrics(pred, true) -> dict[str, float]:
    """``mae = mean|y - ŷ|``, ``rmse = sqrt(mean (y - ŷ)^2)``,
    ``explained_variance = 1 - Var(y - ŷ) / Var(y)`` (sklearn; 1.0 / 0.0 when ``Var(y) = 0``)."""
    yhat = np.asarray(pred.detach().cpu() if isinstance(pred, torch.Tensor) else pred,
                      dtype=np.float64).ravel()
    y = np.asarray(true.detach().cpu() if isinstance(true, torch.Tensor) else true,
                   dtype=np.float64).ravel()
    if y.shape != yhat.shape:
        raise ValueError(f"pred has {len(yhat)} values, true has {len(y)}")
    if len(y) == 0:
        return {"mae": float("nan"), "rmse": float("nan"), "explained_variance": float("nan")}
    err = y - yhat
    var_y, var_err = float(np.var(y)), float(np.var(err))
    if var_y > 0:
        ev = 1.0 - var_err / var_y
    else:
        ev = 1.0 if var_err == 0 else 0.0
    return {"mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err ** 2))),
            "explained_variance": ev}


# ----------------------------------------------------------------------------- exposure
def recommendation_counts(score_fn: ScoreFn, test: Interactions,
                          exclude: Sequence[Interactions] | Interactions = (), *, k: int = 20,
                          users: UsersArg = "nonempty", batch_users: int = 1024, device="cpu",
                          max_batch_bytes: int | None = MAX_BATCH_BYTES) -> np.ndarray:
    """How often each item is in the users' top ``k`` (``[n_items]`` int64), excluded items
    masked and ties broken as :func:`ranking_metrics` does (same users, same batches)."""
    exclude = _as_list(exclude)
    _check_spaces(test, exclude)
    dev = _resolve_device(device)
    n_items = test.n_items
    eval_users, _, excl_csr = _users_and_rows(test, exclude, users)
    excl_rows = _CSRRows(excl_csr, dev)
    k = min(int(k), n_items)
    counts = torch.zeros(n_items, dtype=torch.int64, device=dev)
    bs = batch_size_for(n_items, batch_users, max_batch_bytes)
    for b0 in range(0, len(eval_users), bs):
        u = torch.as_tensor(eval_users[b0:b0 + bs], device=dev)
        with torch.no_grad():
            S = score_fn(u).to(dev)
        if not S.is_floating_point():
            S = S.float()
        S = S.index_put(excl_rows.coords(u), torch.tensor(float("-inf"), device=dev, dtype=S.dtype))
        top = _topk_stable(S, k)
        top = top[S.gather(1, top) > float("-inf")]          # never an excluded item
        counts += torch.bincount(top.reshape(-1), minlength=n_items)
    return counts.cpu().numpy()


def exposure_metrics(counts: np.ndarray, popularity: np.ndarray, k: int) -> dict:
    """Beyond-accuracy figures of top-``k`` lists from their item counts: ``coverage@k`` (share
    of the catalogue recommended to anyone), ``avg_popularity@k`` (mean training popularity,
    i.e. interaction count, of the recommended items, over every slot), ``gini@k`` (Gini
    coefficient of the items' exposure, 0 = every item shown equally often, -> 1 = a few items
    take every slot: ``G = sum_i (2i - n - 1) x_(i) / (n sum x)`` over the counts sorted
    ascending, i = 1..n)."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = len(x), float(x.sum())
    if n == 0 or total == 0:
        return {f"coverage@{k}": 0.0, f"avg_popularity@{k}": float("nan"), f"gini@{k}": float("nan")}
    i = np.arange(1, n + 1, dtype=np.float64)
    gini = float(((2 * i - n - 1) * x).sum() / (n * total))
    pop = float((np.asarray(counts, dtype=np.float64) * np.asarray(popularity, dtype=np.float64)).sum() / total)
    return {f"coverage@{k}": float((x > 0).mean()), f"avg_popularity@{k}": pop, f"gini@{k}": gini}
