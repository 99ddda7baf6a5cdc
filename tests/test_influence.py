"""Influence functions and bilevel values: CG and LiSSA against the explicit Hessian solve, the
sparse per-interaction products against dense per-example gradients, influence against exact
leave-one-out ridge refits, IFT against equilibrium-propagation hypergradients, the valuers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recval_ray.config import TrainConfig
from recval_ray.core.bilevel import bilevel_weights, cosine, hypergradient_ep, hypergradient_ift
from recval_ray.core.data import Interactions, Split
from recval_ray.core.influence import (Objective, influence_values, inverse_hvp, lissa, model_objective,
                                       per_example_dots, per_example_grads_dense, refine)
from recval_ray.core.models.lightgcn import LightGCNConfig
from recval_ray.core.models.mf import MFConfig
from recval_ray.core.models.ncf import NCFConfig
from recval_ray.core.train import train_model
from recval_ray.core.valuers.base import ValuationContext
from recval_ray.registry import VALUERS


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_split(n_users=10, n_items=14, per_user=6, seed=0) -> Split:
    rng = np.random.default_rng(seed)
    items = np.stack([rng.choice(n_items, per_user, replace=False) for _ in range(n_users)])
    r = rng.integers(1, 6, n_users * per_user).astype(np.float32)
    inter = Interactions(np.repeat(np.arange(n_users), per_user), items.ravel(), n_users, n_items, rating=r)
    part = np.tile([0, 0, 0, 0, 1, 2], n_users)[:len(inter)]
    return Split(inter.take(part == 0), inter.take(part == 1), inter.take(part == 2))


TC = TrainConfig(epochs=4, batch_size=16, lr=0.05, device="cpu", patience=100, select_metric="recall@5")
MODELS = {"mf": MFConfig(dim=3, reg=0.1),
          "ncf": NCFConfig(dim=2, mlp_layers=[4, 2], num_negatives=2),
          "ncf-explicit": NCFConfig(dim=2, mlp_layers=[4, 2], mode="explicit"),
          "lightgcn": LightGCNConfig(dim=3, n_layers=2, reg=0.1)}


def trained(kind: str):
    sp = tiny_split()
    res = train_model(MODELS[kind], sp.train, TC, valid=sp.valid)
    return sp, res


def explicit(obj, theta):
    return torch.func.hessian(lambda t: obj.train_loss(t))(theta)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_cg_inverse_hvp_equals_explicit_solve(kind):
    sp, res = trained(kind)
    obj = model_objective(res.task, sp.train, sp.valid, seed=0)
    th = obj.theta
    H = explicit(obj, th)
    assert torch.allclose(H, H.T, atol=1e-10)
    damping = max(0.0, -float(torch.linalg.eigvalsh(H).min())) + 0.5     # positive definite
    g = torch.func.grad(obj.val_loss)(th)
    want = torch.linalg.solve(H + damping * torch.eye(len(th), dtype=th.dtype), g)
    got, info = inverse_hvp(obj, th, g, damping=damping, tol=1e-10, max_iter=2000)
    assert info["converged"] and not info["negative_curvature"]
    assert float((got - want).norm() / want.norm()) < 1e-7
    # an indefinite system is reported, not silently solved
    if float(torch.linalg.eigvalsh(H).min()) < -1e-3:
        _, bad = inverse_hvp(obj, th, g, damping=0.0, tol=1e-10, max_iter=2000)
        assert bad["negative_curvature"] or not bad["converged"] or bad["residual"] < 1e-8


def test_lissa_well_conditioned_and_divergence():
    sp, res = trained("mf")
    obj = model_objective(res.task, sp.train, sp.valid, seed=0)
    th, _ = refine(obj, obj.theta, damping=1.0, steps=300, tol=1e-10)    # PD Hessian at the proximal optimum
    H = explicit(obj, th)
    ev = torch.linalg.eigvalsh(H)
    assert float(ev.min()) > -1.0
    damping = 3.0                                     # contraction 1 - (lambda_min + damping) / scale
    g = torch.func.grad(obj.val_loss)(th)
    want = torch.linalg.solve(H + damping * torch.eye(len(th), dtype=th.dtype), g)
    got, info = inverse_hvp(obj, th, g, damping=damping, solver="lissa", scale=float(ev.max()) + damping,
                            depth=2000, tol=1e-12)
    assert float((got - want).norm() / want.norm()) < 1e-6
    auto, _ = inverse_hvp(obj, th, g, damping=damping, solver="lissa", depth=2000, tol=1e-12)   # scale by power it.
    assert float((auto - want).norm() / want.norm()) < 1e-5
    # scale far below the largest eigenvalue: the recursion blows up, and the error says why
    with pytest.raises(ValueError, match=r"scale=.*damping=3"):
        inverse_hvp(obj, th, g, damping=damping, solver="lissa", scale=0.2 * float(ev.max()), depth=500)
    with pytest.raises(ValueError, match="scale"):
        lissa(lambda v: torch.full_like(v, float("nan")), g, 1.0, 1.0, depth=3)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_sparse_per_interaction_dots_equal_dense_gradients(kind):
    sp, res = trained(kind)
    obj = model_objective(res.task, sp.train, sp.valid, seed=3, negatives=3 if kind == "mf" else None)
    obj.chunk = 7                                            # several chunks, ragged tail
    s = torch.randn(obj.theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dense = per_example_grads_dense(obj, obj.theta, torch.arange(obj.n)) @ s
    fast = per_example_dots(obj, obj.theta, s)
    assert fast.shape == (obj.n,)
    torch.testing.assert_close(fast, dense, rtol=1e-10, atol=1e-12)
    # the dense gradients touch only the row's user and items (plus dense layers for NCF)
    g0 = per_example_grads_dense(obj, obj.theta, torch.tensor([0]))[0]
    if kind == "mf":
        assert int((g0 != 0).sum()) <= 3 * 5 * 3        # p_u, q_i, up to 3 q_j of dim 3
        torch.testing.assert_close(obj.mf_dots(obj.theta, s), dense, rtol=1e-10, atol=1e-12)
    # and the summed per-example gradient is the training loss's gradient
    full = torch.func.grad(lambda t: obj.train_loss(t))(obj.theta)
    torch.testing.assert_close(per_example_grads_dense(obj, obj.theta, torch.arange(obj.n)).sum(0), full)


def ridge_problem(n_users=30, n_items=60, dim=4, per_user=40, lam=1.0, seed=0):
    """MF with item factors FIXED: each user's factors solve a ridge regression of the ratings
    on the item vectors. theta = P (users x dim); l_i = (r_ui - p_u . q_i)^2; penalty lam/2 |P|^2;
    L_val = mean squared error on validation ratings."""
    rng = np.random.default_rng(seed)
    Q = torch.as_tensor(rng.normal(size=(n_items, dim)), dtype=torch.float64)
    P_true = torch.as_tensor(rng.normal(size=(n_users, dim)), dtype=torch.float64)
    items = np.stack([rng.choice(n_items, per_user + 5, replace=False) for _ in range(n_users)])
    u = torch.as_tensor(np.repeat(np.arange(n_users), per_user + 5))
    i = torch.as_tensor(items.ravel())
    r = (P_true[u] * Q[i]).sum(-1) + torch.as_tensor(rng.normal(scale=1.0, size=len(u)))
    is_val = torch.as_tensor(np.tile(np.arange(per_user + 5) >= per_user, n_users))
    tu, ti, tr = u[~is_val], i[~is_val], r[~is_val]
    vu, vi, vr = u[is_val], i[is_val], r[is_val]

    def train_losses(t, rows):
        P = t.view(n_users, dim)
        rr = slice(None) if rows is None else rows
        return (tr[rr] - (P[tu[rr]] * Q[ti[rr]]).sum(-1)).pow(2)

    def val_loss(t):
        P = t.view(n_users, dim)
        return (vr - (P[vu] * Q[vi]).sum(-1)).pow(2).mean()

    # closed-form ridge per user: A_u p_u = b_u, A_u = 2 sum q q^T + lam I, b_u = 2 sum r q
    A = lam * torch.eye(dim, dtype=torch.float64).repeat(n_users, 1, 1)
    A.index_add_(0, tu, 2 * Q[ti][:, :, None] * Q[ti][:, None, :])
    b = torch.zeros(n_users, dim, dtype=torch.float64).index_add_(0, tu, 2 * tr[:, None] * Q[ti])
    P_hat = torch.linalg.solve(A, b)
    obj = Objective(theta=P_hat.reshape(-1), n=len(tu), train_losses=train_losses, val_loss=val_loss,
                    penalty=lambda t: 0.5 * lam * t.pow(2).sum())
    # exact leave-one-out refits of every row at once: the row's user without the row
    qi = Q[ti]
    A_i = A[tu] - 2 * qi[:, :, None] * qi[:, None, :]
    b_i = b[tu] - 2 * tr[:, None] * qi
    p_i = torch.linalg.solve(A_i, b_i)                             # [n, dim]
    # validation loss change: only the row's own user's validation rows move
    err_full = (vr - (P_hat[vu] * Q[vi]).sum(-1)).pow(2)
    per_user_full = torch.zeros(n_users, dtype=torch.float64).index_add_(0, vu, err_full)
    Qv = torch.zeros(n_users, 5, dim, dtype=torch.float64)
    Rv = torch.zeros(n_users, 5, dtype=torch.float64)
    order = torch.argsort(vu, stable=True)
    Qv.view(-1, dim)[:] = Q[vi[order]]
    Rv.view(-1)[:] = vr[order]
    err_loo = (Rv[tu] - torch.einsum("nkd,nd->nk", Qv[tu], p_i)).pow(2).sum(1)
    loo = (err_loo - per_user_full[tu]) / len(vr)
    return obj, loo.numpy()


def test_influence_matches_exact_leave_one_out_on_ridge():
    obj, loo = ridge_problem()
    g = torch.func.grad(lambda t: obj.train_loss(t))(obj.theta)
    assert float(g.abs().max()) < 1e-9                            # closed form = stationary point
    values, info = influence_values(obj, damping=0.0, tol=1e-12, max_iter=500)
    assert info["converged"]
    r = np.corrcoef(values, loo)[0, 1]
    assert r >= 0.95, r
    assert np.sign(values).tolist().count(1) > 0 and np.mean(np.sign(values) == np.sign(loo)) > 0.9
    # same order of magnitude (influence is the first-order term of the exact change)
    assert 0.5 < np.linalg.norm(values) / np.linalg.norm(loo) < 2.0


def test_ift_and_ep_hypergradients_agree():
    sp, res = trained("mf")
    obj = model_objective(res.task, sp.train, sp.valid, seed=0)
    w = torch.linspace(0.5, 1.0, obj.n, dtype=torch.float64)          # a weighted inner problem
    damping = 1.0
    th0, info = refine(obj, obj.theta, w=w, damping=damping, steps=500, tol=1e-11)
    assert info["grad_max"] < 1e-7
    g_ift, _ = hypergradient_ift(obj, th0, w, damping, tol=1e-12)
    for beta, sym in [(0.1, False), (0.01, False), (0.1, True)]:
        g_ep, _ = hypergradient_ep(obj, th0, w, damping, obj.theta, beta, steps=500, tol=1e-11, symmetric=sym)
        assert cosine(g_ift, g_ep) >= 0.99, (beta, sym)
    # at w = 1 the IFT hypergradient is minus the influence value
    th1, _ = refine(obj, obj.theta, damping=damping, steps=500, tol=1e-11)
    g1, _ = hypergradient_ift(obj, th1, torch.ones(obj.n, dtype=torch.float64), damping, tol=1e-12)
    vals, _ = influence_values(obj, th1, damping=damping, tol=1e-12)
    np.testing.assert_allclose(-g1.numpy(), vals, rtol=1e-8, atol=1e-12)


def test_bilevel_lowers_validation_loss():
    sp, res = trained("mf")
    obj = model_objective(res.task, sp.train, sp.valid, seed=0)
    w, info = bilevel_weights(obj, hypergradient="ift", outer_steps=3, outer_lr=0.5, damping=1.0,
                              inner_steps=300, inner_tol=1e-9)
    losses = [s["val_loss"] for s in info["steps"]]
    assert losses[-1] < losses[0]
    assert w.shape == (obj.n,) and w.min() >= 0 and w.max() <= 1 and (w < 1).any()
    assert info["steps"][-1]["inner"]["grad_max"] < 1e-6


def test_influence_valuer_refuses_an_indefinite_hessian():
    sp, res = trained("mf")
    obj = model_objective(res.task, sp.train, sp.valid, seed=0)
    assert float(torch.linalg.eigvalsh(explicit(obj, obj.theta)).min()) < -0.1     # early-stopped: indefinite
    entry = VALUERS.get("influence")
    ctx = ValuationContext(split=sp, base=res, model_cfg=MODELS["mf"], train_cfg=TC, eval_cfg=None)
    with pytest.raises(ValueError, match="valuation.damping 0 leaves the Hessian indefinite"):
        entry.factory(entry.options(damping=0.0)).value(ctx)


@pytest.mark.parametrize("method,kind,opts", [("influence", "mf", {"damping": 3.0}),
                                              ("influence", "mf", {"solver": "lissa", "damping": 3.0, "refine_steps": 20, "lissa_depth": 300}),
                                              ("influence", "ncf", {"damping": 3.0, "validation": "softmax"}),
                                              ("influence", "lightgcn", {"damping": 3.0}),
                                              ("bilevel", "mf", {"outer_steps": 2, "damping": 1.0}),
                                              ("bilevel", "ncf", {"hypergradient": "ep", "outer_steps": 1, "damping": 1.0})])
def test_valuers_run_on_tiny_split(method, kind, opts):
    sp, res = trained(kind)
    entry = VALUERS.get(method)
    o = entry.options(**opts)
    o.validate()
    ctx = ValuationContext(split=sp, base=res, model_cfg=MODELS[kind], train_cfg=TC, eval_cfg=None)
    val = entry.factory(o).value(ctx)
    assert val.method == method and val.values.shape == (len(sp.train),)
    assert np.isfinite(val.values).all()
    col = "influence" if method == "influence" else "weight"
    assert len(val.columns[col]) == len(sp.train)
    assert "seconds" in val.info
    if method == "influence" and opts.get("solver", "cg") == "cg":
        # the same values as the core function at the base model (aligned with train rows)
        obj = model_objective(res.task, sp.train, sp.valid, seed=TC.seed, validation=o.validation)
        want, _ = influence_values(obj, damping=o.damping, tol=o.cg_tol, max_iter=o.cg_max_iter)
        np.testing.assert_allclose(val.values, want, rtol=1e-6, atol=1e-12)
        assert val.info["solve"]["iterations"] >= 1


def test_hessian_vector_products_accumulate_over_chunks_of_rows():
    """The HVP's gradient is accumulated chunk by chunk (memory bounded by one chunk): with
    chunks of 7 rows it equals the one-chunk HVP (float64 rounding), and with one chunk it is
    the plain ``jvp(grad(train_loss))``, bit for bit."""
    import torch
    from torch.func import grad, jvp

    from recval_ray.core.influence import Objective, hvp_fn
    g = torch.Generator().manual_seed(0)
    n, d = 50, 6
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)

    def losses(theta, rows):
        return torch.log1p(torch.exp(-(X[rows] @ theta) * y[rows]))
    theta = torch.randn(d, generator=g, dtype=torch.float64)
    v = torch.randn(d, generator=g, dtype=torch.float64)
    w = torch.rand(n, generator=g, dtype=torch.float64)
    penalty = lambda t: 0.3 * (t ** 4).sum()       # noqa: E731 - a non-quadratic penalty
    one = Objective(theta=theta, n=n, train_losses=losses, val_loss=None, penalty=penalty, chunk=1 << 17)
    many = Objective(theta=theta, n=n, train_losses=losses, val_loss=None, penalty=penalty, chunk=7)
    for weights in (None, w):
        plain = jvp(grad(lambda t: one.train_loss(t, weights)), (theta,), (v,))[1]
        assert torch.equal(hvp_fn(one, theta, weights)(v), plain)
        torch.testing.assert_close(hvp_fn(many, theta, weights, damping=0.5)(v), plain + 0.5 * v,
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("negatives", [1, 3])
def test_mf_closed_form_hvp_and_dots_equal_autograd(negatives):
    """MF's Hessian-vector products in closed form (gathers + index_add_, what CG uses on MF)
    equal forward-over-reverse autograd of the same objective, with row weights, the global
    penalty, ragged chunks and repeated users/items/negatives; the per-row dots equal jvp."""
    import torch
    from torch.func import grad, jvp

    from recval_ray.core.influence import hvp_fn
    sp, res = trained("mf")
    obj = model_objective(res.task, sp.train, sp.valid, seed=2, negatives=negatives, penalty=0.3)
    assert obj.closed_form and obj.penalty_coef == 0.3
    obj.chunk = 7
    gen = torch.Generator().manual_seed(4)
    theta = obj.theta + 0.3 * torch.randn(obj.theta.shape, generator=gen, dtype=torch.float64)
    v = torch.randn(obj.theta.shape, generator=gen, dtype=torch.float64)
    w = torch.rand(obj.n, generator=gen, dtype=torch.float64)
    for weights in (None, w):
        auto = jvp(grad(lambda t: obj.train_loss(t, weights)), (theta,), (v,))[1]
        torch.testing.assert_close(hvp_fn(obj, theta, weights, damping=0.2)(v), auto + 0.2 * v,
                                   rtol=1e-10, atol=1e-12)
    rows = torch.arange(obj.n)
    auto_dots = jvp(lambda t: obj.train_losses(t, rows), (theta,), (v,))[1]
    torch.testing.assert_close(per_example_dots(obj, theta, v), auto_dots, rtol=1e-10, atol=1e-12)
    closed = hvp_fn(obj, theta, w)(v)
    obj.closed_form = False                    # the autograd path: the same products
    torch.testing.assert_close(hvp_fn(obj, theta, w)(v), closed, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="closed form"):
        obj.mf_hvp(theta, v)


@pytest.mark.parametrize("kind", ["mf", "ncf", "ncf-explicit", "lightgcn"])
def test_validation_gradient_accumulated_over_chunks_equals_one_graph(kind):
    """The validation loss's gradient (the right-hand side of every influence solve) is summed
    chunk by chunk of validation rows (10M-row logs: one graph over 0.9M validation rows with 4
    negatives each took ~4 GB); with chunks of 3 rows it equals the single-chunk gradient."""
    from torch.func import grad
    sp, res = trained(kind)
    one = model_objective(res.task, sp.train, sp.valid, seed=1)
    many = model_objective(res.task, sp.train, sp.valid, seed=1, chunk=3)
    assert len(sp.valid) > 3
    torch.testing.assert_close(many.val_gradient(many.theta), grad(one.val_loss)(one.theta), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(many.val_loss(many.theta), one.val_loss(one.theta), rtol=1e-12, atol=1e-14)


def test_cg_reports_every_iteration_with_its_residual():
    from recval_ray.core.influence import conjugate_gradient
    g = torch.Generator().manual_seed(0)
    m = torch.randn(30, 30, generator=g, dtype=torch.float64)
    a = m @ m.T + 30 * torch.eye(30, dtype=torch.float64)
    b = torch.randn(30, generator=g, dtype=torch.float64)
    lines: list = []
    x, info = conjugate_gradient(lambda v: a @ v, b, tol=1e-10, max_iter=100, progress=lines.append)
    assert info["converged"] and len(lines) == info["iterations"] > 1
    assert lines[0].startswith("CG iteration 1/100: relative residual")
    final = float(lines[-1].split("relative residual ")[1].split()[0])
    assert final == pytest.approx(info["residual"], rel=0.05)
    assert torch.allclose(a @ x, b, atol=1e-8)
