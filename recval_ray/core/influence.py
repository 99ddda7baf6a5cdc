"""Influence functions (implicit function theorem) for recommender training data.

Objective. The parameters theta (every tensor of the model, flattened into one float64 vector)
minimise the *sum* of the per-interaction training losses with FIXED seeded negatives,

    L_w(theta) = sum_i w_i l_i(theta) + penalty(theta),        w_i = 1 by default,

where l_i is interaction i's share of the model's own batch loss, its regulariser included
(MF-BPR: ``softplus(s_uj - s_ui) + reg/2 (|p_u|^2 + |q_i|^2 + |q_j|^2)``, mean over the
negatives j drawn once from ``seed``; NeuMF implicit: ``(BCE(f_ui, 1) + sum_j BCE(f_uj, 0)) /
(1 + n_neg)``; NeuMF explicit: ``(r_ui - f_ui)^2``; dropout off). The validation objective
L_val is the mean of the same loss without regulariser over the validation interactions (seeded
negatives outside the user's train and validation items), or (``validation: softmax``) the mean
negative log-likelihood ``-log softmax_items(s_u)[v]`` of the validation items.

Value. With H = Hessian of L_w at theta* and damping lambda,

    value_i = grad L_val(theta*)^T (H + lambda I)^-1 grad l_i(theta*)  =  - dL_val / d eps_i,

eps_i the extra weight of interaction i (Koh & Liang 2017, on the sum loss, i.e. their
I_up,loss times -1/n with their 1/n folded into H). Removing i is eps_i = -1, so
``value_i ~= L_val(without i) - L_val(with i)``: HIGHER = MORE USEFUL (removing it raises the
validation loss; upweighting it lowers it). Damping lambda is exactly the influence of the
proximal objective ``L_w(theta) + lambda/2 |theta - theta*|^2`` (what a warm-started retrain
anchored at theta* measures).

Computation, never materialising H: Hessian-vector products are forward-over-reverse
(``torch.func.jvp`` of ``torch.func.grad``) over the whole training set; s = (H + lambda I)^-1
grad L_val by conjugate gradient (default) or LiSSA (opt-in); then every ``grad l_i . s`` at
once as ONE forward-mode directional derivative ``jvp(theta -> [l_1..l_n], s)``: an
interaction's loss reads only its user's and items' rows (and the dense MLP weights for NCF),
so the tangent is gathered exactly like the parameters (:func:`per_example_dots`; for MF also
the closed form :meth:`ModelObjective.mf_dots`). No loop over interactions.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch.func import functional_call, grad, jvp, vmap
from torch.nn import functional as F

from .data import Interactions


# ---------------------------------------------------------------------------------------
# the objective
# ---------------------------------------------------------------------------------------
@dataclass
class Objective:
    """A bilevel problem over a flat parameter vector.

    ``train_losses(theta, rows)`` -> per-interaction losses ``[len(rows)]`` (rows: LongTensor,
    None = all ``n``); ``val_loss(theta)`` -> scalar; ``penalty(theta)`` -> scalar global
    regulariser (None: 0)."""
    theta: torch.Tensor
    n: int
    train_losses: Callable
    val_loss: Callable
    penalty: Optional[Callable] = None
    chunk: int = 1 << 17
    val_grad: Optional[Callable] = None    # grad val_loss without one graph over every row (optional)

    def val_gradient(self, theta: torch.Tensor) -> torch.Tensor:
        """``grad val_loss(theta)``: the objective's chunked form where it has one."""
        return (self.val_grad(theta) if self.val_grad is not None else grad(self.val_loss)(theta)).detach()

    def train_loss(self, theta: torch.Tensor, w: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``sum_i w_i l_i(theta) + penalty(theta)`` (chunked over rows)."""
        total = theta.new_zeros(())
        for s in range(0, self.n, self.chunk):
            total = total + self.chunk_loss(theta, s, w)
        if self.penalty is not None:
            total = total + self.penalty(theta)
        return total

    def chunk_loss(self, theta: torch.Tensor, start: int, w: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``sum_{i in chunk} w_i l_i(theta)`` over rows ``start .. start + chunk``."""
        rows = torch.arange(start, min(self.n, start + self.chunk), device=theta.device)
        l = self.train_losses(theta, rows)
        return l.sum() if w is None else (w[rows] * l).sum()

    def train_grad(self, theta: torch.Tensor, w: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``grad train_loss(theta)``, accumulated chunk by chunk: reverse mode holds one chunk's
        graph at a time, so memory does not grow with the rows (a single chunk: the same
        expression as ``grad(train_loss)``, bit for bit)."""
        starts = list(range(0, self.n, self.chunk)) or [0]
        total = None
        for k, s in enumerate(starts):
            last = k == len(starts) - 1

            def part(t, s=s, last=last):
                out = t.new_zeros(()) + self.chunk_loss(t, s, w)
                return out + self.penalty(t) if last and self.penalty is not None else out
            g = grad(part)(theta)
            total = g if total is None else total + g
        return total

    def losses(self, theta: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.train_losses(theta, torch.arange(s, min(self.n, s + self.chunk),
                                                                    device=theta.device))
                              for s in range(0, self.n, self.chunk)])


def hvp_fn(obj: Objective, theta: torch.Tensor, w: Optional[torch.Tensor] = None,
           damping: float = 0.0) -> Callable:
    """``v -> (H + damping I) v``, H the Hessian of ``obj.train_loss(., w)`` at ``theta``,
    forward-over-reverse: ``jvp(grad(L), (theta,), (v,))``, the gradient accumulated over
    chunks of rows (:meth:`Objective.train_grad`) so memory is bounded by one chunk."""
    def g(t):
        return obj.train_grad(t, w)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        out = jvp(g, (theta,), (v,))[1]
        return out + damping * v if damping else out

    def closed(v: torch.Tensor) -> torch.Tensor:
        out = obj.mf_hvp(theta, v, w)
        return out + damping * v if damping else out
    return closed if getattr(obj, "closed_form", False) else hvp


def per_example_dots(obj: Objective, theta: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``[grad l_i(theta) . s for every i]`` as directional derivatives: one forward-mode
    ``jvp`` of the loss vector per chunk of rows (the tangent rows are gathered with the
    parameter rows, so this is the sparse per-interaction product)."""
    out = []
    closed = getattr(obj, "closed_form", False)       # MF: the same products by gathers
    for a in range(0, obj.n, obj.chunk):
        if closed:
            out.append(obj.mf_dots(theta, s, slice(a, min(obj.n, a + obj.chunk))).detach())
            continue
        rows = torch.arange(a, min(obj.n, a + obj.chunk), device=theta.device)
        out.append(jvp(lambda t: obj.train_losses(t, rows), (theta,), (s,))[1].detach())
    return torch.cat(out) if out else theta.new_zeros(0)


def per_example_grads_dense(obj: Objective, theta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Dense per-example gradients ``[len(rows), P]`` by ``vmap(grad)`` (the slow reference)."""
    return vmap(grad(lambda t, r: obj.train_losses(t, r[None])[0]), in_dims=(None, 0))(theta, rows)


# ---------------------------------------------------------------------------------------
# solvers
# ---------------------------------------------------------------------------------------
def conjugate_gradient(A: Callable, b: torch.Tensor, tol: float = 1e-6, max_iter: int = 200,
                       x0: Optional[torch.Tensor] = None,
                       progress: Optional[Callable[[str], None]] = None) -> tuple[torch.Tensor, dict]:
    """Solve ``A x = b`` for symmetric A (e.g. a damped Hessian) by conjugate gradient.

    Stops when ``|r| <= tol |b|`` or after ``max_iter`` products. A direction with
    ``p^T A p <= 0`` (A not positive definite: raise the damping) stops it and is reported
    (``negative_curvature``). Info: iterations, relative residual, converged. ``progress``:
    called after each product with the iteration, the relative residual and the time per product."""
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - A(x) if x0 is not None else b.clone()
    p = r.clone()
    rr = torch.dot(r, r)
    bn = float(torch.linalg.vector_norm(b)) or 1.0
    start = math.sqrt(float(rr)) / bn           # 1 from zero; below 1 when x0 is a head start
    it, neg = 0, False
    t_start = time.perf_counter()
    while it < max_iter and math.sqrt(float(rr)) > tol * bn:
        Ap = A(p)
        pAp = torch.dot(p, Ap)
        if float(pAp) <= 0:
            neg = True
            break
        alpha = rr / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = torch.dot(r, r)
        p = r + (rr_new / rr) * p
        rr = rr_new
        it += 1
        if progress is not None:
            progress(f"CG iteration {it}/{max_iter}: relative residual {math.sqrt(float(rr)) / bn:.2e} "
                     f"(target {tol:.0e}), {(time.perf_counter() - t_start) / it:.1f} s per Hessian-vector product")
    res = math.sqrt(float(rr)) / bn
    return x, {"solver": "cg", "iterations": it, "residual": res, "initial_residual": start,
               "converged": res <= tol, "negative_curvature": neg}


def power_iteration(A: Callable, dim_like: torch.Tensor, iters: int = 30, seed: int = 0) -> float:
    """Largest |eigenvalue| of symmetric A by power iteration (LiSSA's default scale)."""
    g = torch.Generator().manual_seed(int(seed))
    v = torch.randn(dim_like.shape, generator=g, dtype=dim_like.dtype).to(dim_like.device)
    v = v / torch.linalg.vector_norm(v)
    lam = 0.0
    for _ in range(iters):
        Av = A(v)
        lam = float(torch.linalg.vector_norm(Av))
        if lam == 0:
            return 0.0
        v = Av / lam
    return lam


def lissa(H: Callable, v: torch.Tensor, damping: float, scale: float, depth: int = 1000,
          tol: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Solve ``(H + damping I) x = v`` by the LiSSA recursion (Agarwal et al.; Koh & Liang's form)

        h_0 = v,   h_{t+1} = v + (1 - d) h_t - H h_t / scale,   x = h_T / scale,   d = damping / scale,

    whose fixed point is ``(H + d scale I) h = scale v``. It converges when the spectrum of H
    lies in ``(-damping, 2 scale - damping)``; then ``|h_t| <= |v| min(t + 1, 1/d)``, so an iterate
    that is non-finite or beyond 10x that bound means divergence: ValueError naming scale and
    damping (raise the scale above H's largest eigenvalue, or raise the damping). ``tol``: stop
    early when ``|h_{t+1} - h_t| <= tol |h_t|``."""
    if scale <= 0:
        raise ValueError(f"LiSSA scale must be > 0, got {scale}")
    d = damping / scale
    vn = float(torch.linalg.vector_norm(v)) or 1.0
    h = v.clone()
    t = 0
    for t in range(depth):
        h_new = v + (1 - d) * h - H(h) / scale
        hn = float(torch.linalg.vector_norm(h_new))
        bound = 10 * vn * (min(t + 2, 1 / d) if d > 0 else t + 2)
        if not math.isfinite(hn) or hn > bound:
            raise ValueError(f"LiSSA diverged at iteration {t + 1} (|h| = {hn:.3g} > {bound:.3g}) with "
                             f"scale={scale:g}, damping={damping:g}: the scale must exceed half the "
                             "Hessian's largest eigenvalue (use a larger lissa_scale) and the damping "
                             "must exceed minus its smallest")
        step = float(torch.linalg.vector_norm(h_new - h))
        h = h_new
        if tol and step <= tol * hn:
            break
    x = h / scale
    return x, {"solver": "lissa", "iterations": t + 1, "scale": scale, "damping": damping}


def inverse_hvp(obj: Objective, theta: torch.Tensor, v: torch.Tensor, *, w=None, damping: float = 0.01,
                solver: str = "cg", tol: float = 1e-6, max_iter: int = 200, scale: Optional[float] = None,
                depth: int = 1000, seed: int = 0, x0: Optional[torch.Tensor] = None,
                progress: Optional[Callable[[str], None]] = None) -> tuple[torch.Tensor, dict]:
    """``(H_w + damping I)^-1 v`` with CG or LiSSA; info carries the true relative residual.
    ``x0``: CG's starting point (e.g. an earlier run's solve: ``recval update``); ``progress``:
    CG's per-iteration report."""
    A = hvp_fn(obj, theta, w, damping)
    t0 = time.perf_counter()
    if solver == "cg":
        x, info = conjugate_gradient(A, v, tol, max_iter, x0=x0, progress=progress)
        info["warm_start"] = x0 is not None
    elif solver == "lissa":
        if scale is None:
            # (H + damping) / scale must have its spectrum in (0, 2): 1.05 (|lambda|_max + damping)
            scale = 1.05 * (power_iteration(hvp_fn(obj, theta, w, 0.0), v, seed=seed) + damping) or 1.0
        x, info = lissa(hvp_fn(obj, theta, w, 0.0), v, damping, scale, depth, tol)
        info["residual"] = float(torch.linalg.vector_norm(A(x) - v) / (torch.linalg.vector_norm(v) or 1.0))
    else:
        raise ValueError(f"unknown inverse-HVP solver {solver!r} (cg or lissa)")
    info["seconds"] = time.perf_counter() - t0
    return x, info


def influence_values(obj: Objective, theta: Optional[torch.Tensor] = None, solution: Optional[list] = None,
                     **solve) -> tuple[np.ndarray, dict]:
    """``value_i = grad L_val^T (H + lambda I)^-1 grad l_i`` at ``theta`` (default ``obj.theta``),
    ``~= L_val(without i) - L_val(with i)``. ``solve``: :func:`inverse_hvp` options (``x0``: a
    starting point); ``solution``: a list the solve ``s`` is appended to (what an update reuses)."""
    theta = obj.theta if theta is None else theta
    t0 = time.perf_counter()
    g_val = obj.val_gradient(theta)
    s, info = inverse_hvp(obj, theta, g_val, **solve)
    if solution is not None:
        solution.append(s)
    t1 = time.perf_counter()
    vals = per_example_dots(obj, theta, s)
    info.update(grad_val_norm=float(torch.linalg.vector_norm(g_val)),
                dots_seconds=time.perf_counter() - t1, seconds=time.perf_counter() - t0)
    return vals.cpu().numpy().astype(np.float64), info


# ---------------------------------------------------------------------------------------
# recommender objectives (MF-BPR, NeuMF)
# ---------------------------------------------------------------------------------------
def seeded_generator(seed: int, stream: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), 0x1F1, int(stream)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


HVP_CHUNK = 1 << 16     # rows per step of MF's closed-form Hessian-vector product


@dataclass
class ModelObjective(Objective):
    """:class:`Objective` of a trained MF / NeuMF task; ``unflatten(theta)`` -> parameter dict,
    ``load(theta)`` writes theta back into the module."""
    module: Optional[torch.nn.Module] = None
    names: list = field(default_factory=list)
    shapes: list = field(default_factory=list)
    kind: str = "mf"
    reg: float = 0.0
    data: dict = field(default_factory=dict)
    pair_score: Optional[Callable] = None     # (theta, users, items) -> the model's scores
    closed_form: bool = False                 # MF: Hessian-vector products and dots in closed form
    penalty_coef: float = 0.0                 # the global penalty's coefficient (penalty/2 |theta|^2)

    def unflatten(self, theta: torch.Tensor) -> dict:
        sizes = [math.prod(s) for s in self.shapes]
        return {n: t.view(s) for n, t, s in zip(self.names, theta.split(sizes), self.shapes)}

    def load(self, theta: torch.Tensor) -> None:
        with torch.no_grad():
            for n, t in self.unflatten(theta).items():
                dict(self.module.named_parameters())[n].copy_(t.to(dtype=torch.float32))

    def mf_dots(self, theta: torch.Tensor, s: torch.Tensor, rows: Optional[slice] = None) -> torch.Tensor:
        """MF only: ``grad l_i . s`` in closed form by gathers (``rows``: a slice of the rows;
        default all). With x_j = s_uj - s_ui and sig_j = sigmoid(x_j), N negatives:
        d/dp_u = mean_j sig_j (q_j - q_i) + reg p_u,  d/dq_i = -mean_j sig_j p_u + reg q_i,
        d/dq_j = sig_j p_u / N + reg q_j / N."""
        if self.kind != "mf":
            raise ValueError("mf_dots is MF's closed form")
        P, Q = self.unflatten(theta).values()
        SP, SQ = self.unflatten(s).values()
        rows = slice(None) if rows is None else rows
        u, i, j = self.data["user"][rows], self.data["item"][rows], self.data["neg"][rows]
        pu, qi, qj = P[u], Q[i], Q[j]                                   # [n,d], [n,d], [n,N,d]
        sig = torch.sigmoid(torch.einsum("nd,nkd->nk", pu, qj) - (pu * qi).sum(-1, keepdim=True))
        N = j.shape[1]
        su, si, sj = SP[u], SQ[i], SQ[j]
        gu = (sig[..., None] * (qj - qi[:, None])).mean(1) + self.reg * pu
        gi = -sig.mean(1, keepdim=True) * pu + self.reg * qi
        dot_j = (sig * torch.einsum("nd,nkd->nk", pu, sj)).sum(1) / N + \
            self.reg * (qj * sj).sum(-1).sum(1) / N
        return (gu * su).sum(-1) + (gi * si).sum(-1) + dot_j

    def mf_hvp(self, theta: torch.Tensor, v: torch.Tensor, w: Optional[torch.Tensor] = None) -> torch.Tensor:
        """MF only: ``H v`` of ``sum_i w_i l_i`` (+ the global penalty) in closed form, chunk by
        chunk (gathers, then ``index_add_`` into the user and item tables): no autograd graph,
        memory of one chunk. With d_j = q_j - q_i, x_j = p_u . d_j, sig_j, h_j = sig_j (1 - sig_j),
        direction (a, b) and dx_j = a_u . d_j + p_u . (b_j - b_i), per row (N negatives):
        H_p v = mean_j [h_j dx_j d_j + sig_j (b_j - b_i)] + reg a_u,
        H_qi v = -mean_j [h_j dx_j p_u + sig_j a_u] + reg b_i,
        H_qj v = [h_j dx_j p_u + sig_j a_u + reg b_j] / N."""
        if self.kind != "mf" or not self.closed_form:
            raise ValueError("mf_hvp is MF's closed form")
        P, Q = self.unflatten(theta).values()
        A, B = self.unflatten(v).values()
        out = torch.zeros_like(theta)
        OP, OQ = self.unflatten(out).values()            # views into out
        users, items, negs = self.data["user"], self.data["item"], self.data["neg"]
        N = negs.shape[1]
        step = min(self.chunk, HVP_CHUNK)
        for a in range(0, self.n, step):
            r = slice(a, min(self.n, a + step))
            u, i, j = users[r], items[r], negs[r]
            pu, qi, au, bi = P[u], Q[i], A[u], B[i]
            qj, bj = Q[j], B[j]                                          # [c,N,d]
            sig = torch.sigmoid((qj * pu[:, None]).sum(-1) - (pu * qi).sum(-1, keepdim=True))     # [c,N]
            dx = (qj * au[:, None]).sum(-1) - (au * qi).sum(-1, keepdim=True) + \
                (bj * pu[:, None]).sum(-1) - (pu * bi).sum(-1, keepdim=True)
            coef = sig * (1 - sig) * dx / N
            sn = sig / N
            reg = torch.full((len(u), 1), self.reg, dtype=theta.dtype, device=theta.device)
            if w is not None:
                rw = w[r].to(theta.dtype)[:, None]
                coef, sn, reg = coef * rw, sn * rw, reg * rw
            c_sum, s_sum = coef.sum(1, keepdim=True), sn.sum(1, keepdim=True)
            hp = (coef[..., None] * qj).sum(1) - c_sum * qi + (sn[..., None] * bj).sum(1) - s_sum * bi + reg * au
            OP.index_add_(0, u, hp)
            OQ.index_add_(0, i, -c_sum * pu - s_sum * au + reg * bi)
            bj.mul_((reg / N)[..., None])
            bj.addcmul_(coef[..., None], pu[:, None]).addcmul_(sn[..., None], au[:, None])
            OQ.index_add_(0, j.reshape(-1), bj.reshape(-1, bj.shape[-1]))
        if self.penalty_coef:
            out += self.penalty_coef * v
        return out


def model_objective(task, train: Interactions, valid: Interactions, *, seed: int,
                    negatives: Optional[int] = None, valid_negatives: int = 4,
                    validation: str = "loss", penalty: float = 0.0,
                    dtype: torch.dtype = torch.float64, chunk: int = 1 << 17,
                    kept_negatives: Optional[dict] = None) -> ModelObjective:
    """The :class:`Objective` of a trained MF-BPR (``BPRTask`` with plain BPR) or NeuMF task:
    theta = the model's parameters (a float64 copy); every training row gets ``negatives``
    (default: the task's) items outside the user's training items, and every validation row
    ``valid_negatives`` items outside its train and validation items, drawn once from
    ``seed``; ``validation``: ``loss`` (the model's loss without regulariser) or ``softmax``
    (mean -log softmax over all items of the validation item's score); ``penalty``: an extra
    ``penalty/2 |theta|^2``. ``kept_negatives`` (``recval update``: an earlier objective's
    ``{"neg", "vneg"}``): the first rows and the validation rows keep those negatives, so the
    objective of the rows the earlier run had is the same one; only appended rows draw theirs."""
    from .models.lightgcn import LightGCN, propagate_embeddings
    from .models.mf import MF, NegativeSampler
    from .models.ncf import NeuMF
    module = task.model
    if isinstance(module, (MF, LightGCN)):
        kind = "mf" if isinstance(module, MF) else "lightgcn"
        if getattr(task, "kind", "bpr") not in ("bpr", None):
            pass  # the objective is plain BPR whatever the denoiser trained with (documented)
        reg = float(task.reg)
    elif isinstance(module, NeuMF):
        kind = "ncf-explicit" if module.explicit else "ncf"
        reg = 0.0
        if module.dropout > 0:
            pass  # dropout is off in the objective
    else:
        raise ValueError(f"influence functions support model.kind mf, lightgcn and ncf, not {type(module).__name__}")
    if validation not in ("loss", "softmax"):
        raise ValueError(f"validation objective {validation!r}: loss or softmax")
    if len(valid) == 0:
        raise ValueError("influence functions need a validation split (the validation loss)")
    dev = next(module.parameters()).device
    names, shapes, flat = [], [], []
    for n, p in module.named_parameters():
        names.append(n)
        shapes.append(tuple(p.shape))
        flat.append(p.detach().to(dtype).reshape(-1))
    theta = torch.cat(flat).to(dev)
    n_neg = int(negatives if negatives is not None else getattr(task, "num_negatives", 1))
    users = torch.as_tensor(train.user, dtype=torch.long, device=dev)
    items = torch.as_tensor(train.item, dtype=torch.long, device=dev)
    vu = torch.as_tensor(valid.user, dtype=torch.long, device=dev)
    vi = torch.as_tensor(valid.item, dtype=torch.long, device=dev)
    data = {"user": users, "item": items}
    if kind != "ncf-explicit":
        kept = kept_negatives or {}
        old_neg, old_vneg = kept.get("neg"), kept.get("vneg")
        if old_neg is not None and (old_neg.shape[0] > len(train) or old_neg.shape[1] != n_neg):
            old_neg = None                      # another objective's: draw every row's
        if old_neg is None:
            data["neg"] = NegativeSampler(train, dev).sample(users, n_neg, seeded_generator(seed, 0))
        else:
            nb = int(old_neg.shape[0])
            fresh = NegativeSampler(train, dev).sample(users[nb:], n_neg, seeded_generator(seed, 2)) \
                if nb < len(train) else users.new_zeros((0, n_neg))
            data["neg"] = torch.cat([old_neg.to(device=dev, dtype=torch.long), fresh])
        if old_vneg is not None and old_vneg.shape == (len(valid), max(1, int(valid_negatives))):
            vneg = old_vneg.to(device=dev, dtype=torch.long)
        else:
            both = Interactions(np.concatenate([train.user, valid.user]), np.concatenate([train.item, valid.item]),
                                train.n_users, train.n_items)
            vneg = NegativeSampler(both, dev).sample(vu, max(1, int(valid_negatives)), seeded_generator(seed, 1))
        data["vneg"] = vneg
    else:
        if train.rating is None or valid.rating is None:
            raise ValueError("explicit NeuMF influence needs ratings on train and validation")
        data["rating"] = torch.as_tensor(train.rating, dtype=dtype, device=dev)
        vr = torch.as_tensor(valid.rating, dtype=dtype, device=dev)
    obj = ModelObjective(theta=theta, n=len(train), train_losses=None, val_loss=None, chunk=chunk,
                         module=module, names=names, shapes=shapes, kind=kind, reg=reg, data=data)
    unflatten = obj.unflatten

    if kind in ("mf", "lightgcn"):
        # LightGCN: the graph in theta's dtype, converted once here (not inside a transform)
        adj = module.adj.to(dtype) if kind == "lightgcn" else None

        def embeddings(p):
            """Scoring embeddings: MF's tables, or LightGCN's propagation of its ego tables."""
            if kind == "mf":
                return p["user_emb.weight"], p["item_emb.weight"]
            return propagate_embeddings(adj, module.n_layers, p["user_emb.weight"], p["item_emb.weight"])

        def pair_losses(params, u, i, j):
            if kind == "lightgcn":     # LightGCN.bpr_terms on the final embeddings, L2 on the ego ones
                eu, ei = embeddings(params)
                pu = eu[u]
                s_pos = (pu * ei[i]).sum(-1)
                s_neg = torch.einsum("bd,bnd->bn", pu, ei[j])
                P0, Q0 = params["user_emb.weight"], params["item_emb.weight"]
                l2 = 0.5 * (P0[u].pow(2).sum(-1) + Q0[i].pow(2).sum(-1) + Q0[j].pow(2).sum(-1).mean(-1))
                return F.softplus(s_neg - s_pos[:, None]).mean(-1), l2
            s_pos, s_neg, l2 = functional_call(module, params, (u, i, j))
            return F.softplus(s_neg - s_pos[:, None]).mean(-1), l2

        def train_losses(t, rows):
            u = users if rows is None else users[rows]
            i = items if rows is None else items[rows]
            j = data["neg"] if rows is None else data["neg"][rows]
            per, l2 = pair_losses(unflatten(t), u, i, j)
            return per + reg * l2

        def scores(t, u):
            eu, ei = embeddings(unflatten(t))
            return eu[u] @ ei.T

        def val_sum(t, r):
            return pair_losses(unflatten(t), vu[r], vi[r], vneg[r])[0].sum()

        def pair_score(t, u, i):
            eu, ei = embeddings(unflatten(t))
            return (eu[u] * ei[i]).sum(-1)
    else:
        def ncf_loss(params, u, i, j):
            n = j.shape[1]
            us = torch.cat([u, u.repeat_interleave(n)])
            it = torch.cat([i, j.reshape(-1)])
            f = functional_call(module, params, (us, it))
            b = len(u)
            return (F.softplus(-f[:b]) + F.softplus(f[b:]).reshape(b, n).sum(1)) / (1 + n)

        def train_losses(t, rows):
            u = users if rows is None else users[rows]
            i = items if rows is None else items[rows]
            if kind == "ncf-explicit":
                r = data["rating"] if rows is None else data["rating"][rows]
                return (functional_call(module, unflatten(t), (u, i)) - r).pow(2)
            j = data["neg"] if rows is None else data["neg"][rows]
            return ncf_loss(unflatten(t), u, i, j)

        def scores(t, u):
            return functional_call(module, unflatten(t), (u.repeat_interleave(train.n_items),
                                   torch.arange(train.n_items, device=dev).repeat(len(u)))).view(len(u), -1)

        def pair_score(t, u, i):
            return functional_call(module, unflatten(t), (u, i))

        def val_sum(t, r):
            if kind == "ncf-explicit":
                return (functional_call(module, unflatten(t), (vu[r], vi[r])) - vr[r]).pow(2).sum()
            return ncf_loss(unflatten(t), vu[r], vi[r], vneg[r]).sum()

    def val_softmax(t):
        uu, inv = torch.unique(vu, return_inverse=True)
        logp = torch.log_softmax(scores(t, uu), -1)
        return -logp[inv, vi].mean()

    obj.train_losses = train_losses
    obj.pair_score = pair_score        # the model's score s(u, i) as a function of theta
    n_val = len(valid)
    val_chunks = [slice(a, min(n_val, a + chunk)) for a in range(0, n_val, chunk)]

    def val_pair(t):
        """The mean validation loss, summed chunk by chunk of validation rows."""
        total = t.new_zeros(())
        for r in val_chunks:
            total = total + val_sum(t, r)
        return total / n_val

    def val_pair_grad(t):
        """``grad val_pair``, accumulated chunk by chunk (one chunk's graph at a time)."""
        total = None
        for r in val_chunks:
            g = grad(lambda x, r=r: val_sum(x, r))(t)
            total = g if total is None else total + g
        return total / n_val

    obj.val_loss = val_softmax if validation == "softmax" else val_pair
    if validation != "softmax":
        obj.val_grad = val_pair_grad
    if penalty:
        obj.penalty = lambda t: 0.5 * penalty * t.pow(2).sum()
        obj.penalty_coef = float(penalty)
    obj.closed_form = kind == "mf"
    return obj


def refine(obj: Objective, theta0: torch.Tensor, *, w=None, damping: float = 0.0, anchor=None,
           beta: float = 0.0, steps: int = 200, tol: float = 1e-8, history: int = 20) -> tuple[torch.Tensor, dict]:
    """Minimise ``L_w(theta) + damping/2 |theta - anchor|^2 + beta L_val(theta)`` from ``theta0``
    by full-batch L-BFGS (strong Wolfe line search), at most ``steps`` iterations, until the
    gradient's largest entry is ``<= tol``. Info: iterations (function evaluations), final
    gradient norm (2-norm and max), objective."""
    anchor = theta0.detach() if anchor is None else anchor.detach()
    x = theta0.detach().clone().requires_grad_(True)

    def f(t):
        out = obj.train_loss(t, w)
        if damping:
            out = out + 0.5 * damping * (t - anchor).pow(2).sum()
        if beta:
            out = out + beta * obj.val_loss(t)
        return out

    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=max(1, steps), max_eval=max(1, int(steps * 1.5)),
                            tolerance_grad=tol, tolerance_change=0.0, history_size=history,
                            line_search_fn="strong_wolfe")
    evals = [0]

    def closure():
        opt.zero_grad()
        v = f(x)
        v.backward()
        evals[0] += 1
        return v

    t0 = time.perf_counter()
    if steps > 0:
        opt.step(closure)
    x = x.detach()
    gx = grad(f)(x)
    st = opt.state[opt._params[0]]
    return x, {"iterations": int(st.get("n_iter", 0)), "evaluations": evals[0],
               "grad_norm": float(torch.linalg.vector_norm(gx)), "grad_max": float(gx.abs().max()),
               "objective": float(f(x)), "seconds": time.perf_counter() - t0}
