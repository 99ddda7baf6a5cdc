"""Why did user U get item X: attribution of one score to the training interactions.

The target is the model's score ``s(U, X; theta)``. A training row ``r`` (with its fixed
seeded negatives, :func:`~.influence.model_objective`) contributes to it:

- **TracInCP** (Pruthi et al. 2020) over checkpoints ``c`` taken with learning rate ``eta_c``:
  a gradient step on ``r`` moves the score by ``-eta grad l_r . grad s``, so

      contribution_r = - sum_c eta_c  grad l_r(theta_c) . grad s(U, X; theta_c);

- **influence** (Koh & Liang 2017): removing ``r`` moves the optimum by ``(H + lambda I)^-1
  grad l_r``, so the score it holds up is

      contribution_r = - grad s(U, X)^T (H + lambda I)^-1 grad l_r      (one CG solve per query).

Positive: a *proponent* (the score would fall without the row); negative: an *opponent*.

Row-sparse for MF: ``grad s(U, X)`` touches only ``P_U`` and ``Q_X``, and ``grad l_r`` only
``P_u, Q_i, Q_j``, so every row other than the user's own, the item's, and those that drew ``X``
as a negative contributes exactly 0 to TracIn: only those rows are computed
(:func:`touching_rows`), O(|rows of U| + |rows of X|) per query instead of O(n). NeuMF (shared
MLP weights) and LightGCN (every row's gradient reaches every embedding through the graph
propagation, whose forward-mode rule is the propagation itself) take every row, in one
forward-mode pass per chunk (:func:`~.influence.per_example_dots`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch.func import grad, jvp

#: the model kinds with an attribution objective (:func:`~.influence.model_objective`)
MODEL_KINDS = ("mf", "ncf", "lightgcn")
#: memory for the stacked tangents of one batched TracIn pass (:func:`tracin_many`)
TANGENT_BYTES = 256 << 20


def score_gradient(obj, theta: torch.Tensor, user: int, item: int) -> torch.Tensor:
    """``grad_theta s(user, item; theta)`` as a flat vector like ``theta``."""
    dev = theta.device
    u = torch.tensor([int(user)], device=dev)
    i = torch.tensor([int(item)], device=dev)
    return grad(lambda t: obj.pair_score(t, u, i).sum())(theta).detach()


def touching_rows(obj, user: int, item: int) -> Optional[torch.Tensor]:
    """MF: the training rows whose gradient can meet ``grad s(user, item)``: the user's own rows,
    the item's rows, and rows with the item among their negatives; None for other models (every
    row)."""
    if obj.kind != "mf":
        return None
    d = obj.data
    hit = (d["user"] == int(user)) | (d["item"] == int(item)) | (d["neg"] == int(item)).any(1)
    return torch.nonzero(hit).reshape(-1)


def dots_on(obj, theta: torch.Tensor, s: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """``grad l_r(theta) . s`` for ``rows`` (None: every row), one forward-mode pass per chunk."""
    if rows is None:
        from .influence import per_example_dots
        return per_example_dots(obj, theta, s)
    out = []
    for a in range(0, len(rows), obj.chunk):
        r = rows[a:a + obj.chunk]
        out.append(jvp(lambda t: obj.train_losses(t, r), (theta,), (s,))[1].detach())
    return torch.cat(out) if out else theta.new_zeros(0)


@dataclass
class Attribution:
    """One query's contributions: ``scores[r]`` for every training row (0 where the structure
    makes it exactly 0), the score of the target, the rows computed and the method."""
    user: int
    item: int
    scores: np.ndarray
    target_score: float
    method: str
    rows_computed: int
    info: dict = field(default_factory=dict)

    def top(self, k: int, sign: int = 1) -> np.ndarray:
        """The ``k`` strongest proponents (``sign`` 1) or opponents (-1), strongest first,
        only rows with a contribution of that sign."""
        s = sign * self.scores
        order = np.argsort(-s, kind="stable")[:k]
        return order[s[order] > 0]

    def shares(self, users: np.ndarray, items: np.ndarray) -> dict:
        """How the summed positive contributions split between the user's own rows, the item's
        rows (other users) and the rest."""
        own = users == self.user
        its = (items == self.item) & ~own
        pos = np.clip(self.scores, 0, None)
        tot = float(pos.sum()) or 1.0
        return {"user_rows": float(pos[own].sum()) / tot, "item_rows": float(pos[its].sum()) / tot,
                "other_rows": float(pos[~own & ~its].sum()) / tot}


def tracin(objectives: Sequence[tuple], user: int, item: int, sparse: bool = True) -> Attribution:
    """TracInCP of ``s(user, item)`` over ``objectives``: ``(objective, theta, lr)`` per checkpoint
    (the same rows and negatives in each). ``sparse``: MF's row-sparse computation."""
    n = objectives[0][0].n
    total = torch.zeros(n, dtype=torch.float64)
    computed = n
    target = float("nan")
    for obj, theta, lr in objectives:
        s = score_gradient(obj, theta, user, item)
        rows = touching_rows(obj, user, item) if sparse else None
        d = dots_on(obj, theta, s, rows).to(torch.float64).cpu()
        if rows is None:
            total -= float(lr) * d
        else:
            total.index_add_(0, rows.cpu(), -float(lr) * d)
            computed = int(len(rows))
        with torch.no_grad():
            dev = theta.device
            target = float(obj.pair_score(theta, torch.tensor([int(user)], device=dev),
                                          torch.tensor([int(item)], device=dev))[0])
    return Attribution(int(user), int(item), total.numpy(), target, "tracin", computed,
                       {"checkpoints": len(objectives), "sparse": bool(sparse and computed < n)})


def tracin_many(objectives: Sequence[tuple], queries: Sequence[tuple], sparse: bool = True) -> list:
    """TracInCP of several ``(user, item)`` queries at once, equal to :func:`tracin` of each.
    MF (row-sparse) computes each query's touching rows alone. Otherwise the per-row
    directional derivatives of every query come from one forward-mode pass per chunk of rows,
    ``vmap``-ed over the queries' score gradients: the primal computation (LightGCN's graph
    propagation, NeuMF's MLP) is shared, only the tangents are per query."""
    queries = [(int(u), int(x)) for u, x in queries]
    if not queries:
        return []
    obj0 = objectives[0][0]
    if sparse and obj0.kind == "mf":
        return [tracin(objectives, u, x, sparse=True) for u, x in queries]
    n = obj0.n
    total = torch.zeros(len(queries), n, dtype=torch.float64)
    # queries per vmapped pass: their tangents (one theta-sized vector each) within TANGENT_BYTES
    per = max(1, min(len(queries), TANGENT_BYTES // (8 * int(objectives[0][1].numel()))))
    for obj, theta, lr in objectives:
        for q0 in range(0, len(queries), per):
            S = torch.stack([score_gradient(obj, theta, u, x) for u, x in queries[q0:q0 + per]])
            for a in range(0, n, obj.chunk):
                rows = torch.arange(a, min(n, a + obj.chunk), device=theta.device)
                d = torch.func.vmap(lambda s: jvp(lambda t: obj.train_losses(t, rows), (theta,), (s,))[1])(S)
                total[q0:q0 + len(S), a:a + len(rows)] -= float(lr) * d.detach().to(torch.float64).cpu()
    obj, theta, _ = objectives[-1]
    with torch.no_grad():
        dev = theta.device
        target = obj.pair_score(theta, torch.tensor([u for u, _ in queries], device=dev),
                                torch.tensor([x for _, x in queries], device=dev)).tolist()
    return [Attribution(u, x, total[q].numpy(), float(target[q]), "tracin", n,
                        {"checkpoints": len(objectives), "sparse": False, "batched": len(queries)})
            for q, (u, x) in enumerate(queries)]


def influence(obj, theta: torch.Tensor, user: int, item: int, *, damping: float, tol: float = 1e-6,
              max_iter: int = 300) -> Attribution:
    """Influence of every row on ``s(user, item)`` (module docstring), one CG solve of the
    damped Hessian against ``grad s``; info carries the solve."""
    from .influence import inverse_hvp
    g = score_gradient(obj, theta, user, item)
    h_inv_g, info = inverse_hvp(obj, theta, g, damping=damping, solver="cg", tol=tol, max_iter=max_iter)
    from .influence import per_example_dots
    d = per_example_dots(obj, theta, h_inv_g).to(torch.float64).cpu()
    with torch.no_grad():
        dev = theta.device
        target = float(obj.pair_score(theta, torch.tensor([int(user)], device=dev),
                                      torch.tensor([int(item)], device=dev))[0])
    return Attribution(int(user), int(item), (-d).numpy(), target, "influence", obj.n, {"solve": info})


def rank_of(scores_row: np.ndarray, item: int, exclude: np.ndarray) -> int:
    """1-based rank of ``item`` among the items not in ``exclude`` (the user's training items):
    1 + the number of those items scoring strictly higher."""
    s = scores_row.astype(np.float64).copy()
    s[exclude] = -np.inf
    return int((s > s[item]).sum()) + 1


def top_recommendation_examples(task, train, valid, *, users: int = 3, top: int = 5, seed: int = 0,
                                lr: float = 1.0) -> list[dict]:
    """For ``users`` seeded users: their top-1 recommendation (training items excluded) and its
    ``top`` strongest proponents by TracIn at the final weights (one checkpoint, step ``lr``),
    as codes: ``{user, item, score, proponents: [(row, user, item, contribution)], share_user_rows}``.
    What the run's report shows; ``recval why`` does the same over every checkpoint."""
    from .influence import model_objective
    rng = np.random.default_rng([int(seed), 0x3E])
    active = np.unique(train.user)
    chosen = np.sort(rng.choice(active, min(int(users), len(active)), replace=False))
    obj = model_objective(task, train, valid, seed=int(seed))
    csr = train.csr()
    with torch.no_grad():
        sc = task.model.score_users(torch.as_tensor(chosen)).cpu().numpy()
    out = []
    for r, u in enumerate(chosen.tolist()):
        sc[r, csr.indices[csr.indptr[u]:csr.indptr[u + 1]]] = -np.inf
        x = int(sc[r].argmax())
        att = tracin([(obj, obj.theta, lr)], u, x)
        pro = att.top(top, 1)
        out.append({"user": u, "item": x, "score": float(sc[r, x]),
                    "proponents": [(int(p), int(train.user[p]), int(train.item[p]), float(att.scores[p]))
                                   for p in pro],
                    "share_user_rows": att.shares(train.user, train.item)["user_rows"]})
    return out
