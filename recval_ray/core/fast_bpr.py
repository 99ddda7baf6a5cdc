"""Row-sparse MF-BPR training without autograd (``train.engine: sparse``).

The autograd engine (:class:`~.models.mf.BPRTask` + :func:`~.train.fit`'s optimiser) builds a
graph per batch, backpropagates into dense ``[n_rows, dim]`` gradients of both embedding tables
and lets a dense optimiser touch every row. For MF-BPR the gradient is known in closed form and
touches only the batch's rows, so :class:`SparseBPRTask` does one step as a handful of
vectorised ops on preallocated buffers:

1. gather the batch's user rows ``p_u`` and item rows ``q_i`` (positives) and ``q_j``
   (negatives) with ``index_select`` into preallocated buffers;
2. ``x = s_ui - s_uj = p_u . (q_i - q_j)``, per-example loss ``softplus(-x)`` and
   ``sigmoid(-x)``, no autograd;
3. the gradient rows of :mod:`.models.mf`'s loss ``mean_b l_b + reg * mean_b l2_b`` (``l2 =
   (|p_u|^2 + |q_i|^2 + mean_k |q_jk|^2) / 2``), with ``g = -sigmoid(-x)`` and ``n``
   negatives per example::

       dL/dp_u  = (sum_k g_k (q_i - q_jk) / n + reg p_u) / B
       dL/dq_i  = (sum_k g_k p_u / n         + reg q_i) / B
       dL/dq_jk = (-g_k p_u / n              + reg q_jk / n) / B

   summed over a row's occurrences in the batch (``index_add_``, deterministic on the CPU);
4. a row-sparse optimiser step on the touched rows only:

   * ``sgd``: ``w -= lr * grad``, scattered straight into the table (SGD is linear in the
     gradient, so this equals accumulating the gradient first). Identical, up to float
     rounding, to the autograd engine with ``optimizer: sgd`` and ``weight_decay: 0``: the
     batches are the same (see below) and rows a batch does not touch have zero gradient.
   * ``adam``: the "lazy" Adam of ``torch.optim.SparseAdam``: first and second moments of a
     row are updated only on steps that touch it (with the gradient summed over its
     occurrences); the bias correction uses the table's step count (every step counts),
     ``w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``. This differs from the
     autograd engine's dense ``torch.optim.Adam`` (which keeps moving rows with stale momentum
     when they are not in the batch, and places eps after the bias correction).

Batches and negatives come from :class:`~.models.mf.BPRTask`'s own per-epoch stream (the
``(seed, epoch)`` generator of :func:`~.train.fit`), with a faster exact sampler
(:class:`FastNegativeSampler`) that returns exactly the same negatives as
:class:`~.models.mf.NegativeSampler`. Nothing is nondeterministic: the same seed gives the same
weights bit for bit (CPU), there is no Hogwild. The engine runs inside the generic
:func:`~.train.fit` loop (epochs, validation, early stopping, checkpoints, per-interaction loss
tracking) through the task's ``train_step`` hook.

PLD (``train.denoise.kind: pld``): the batches carry each slot's pool; the step first picks
the slot's positive with the parent's own choice (:meth:`~.models.mf.BPRTask.pld_chooser`: the
pool's losses under the current weights, Gumbel-max on the batch's uniforms), then takes the
plain BPR step above on the chosen triples, as the autograd engine does.

``train.fused: true`` (SGD only): the same step as one whole-tensor function
(:func:`fused_sgd_step`) compiled by ``torch.compile`` into fused loops; equal to the eager step
up to float rounding, compiled once per batch shape (a last, smaller batch takes the eager step).

Supported: ``model.kind: mf``, ``train.denoise.kind`` ``bpr`` or ``pld``, ``train.optimizer``
``sgd``, ``adam`` or ``adamw`` (``adamw`` = ``adam`` here: ``train.weight_decay: 0`` is required;
regularise with ``model.reg``), in-process or one Ray Train worker. :func:`check_engine` raises
a :class:`~recval_ray.errors.ConfigError` otherwise.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .errors import ConfigError
from .data import Interactions
from .denoise import DenoiseConfig
from .models.mf import BPRTask, NegativeSampler, choose_positive
from .registry import MODELS

ENGINES = ("autograd", "sparse", "native")   # native: core/native_bpr.py (a C kernel)
SPARSE_OPTIMIZERS = ("sgd", "adam", "adamw")
SPARSE_DENOISE = ("bpr", "pld")
CHUNK_ROWS = 1 << 18      # rows whose batches (users, items, negatives) are drawn at once


def check_engine(train_cfg, model_kind: str = "mf") -> None:
    """Raise :class:`ConfigError` (naming the key) when ``train.engine: sparse`` cannot run the
    job's settings; nothing for ``autograd``."""
    engine = getattr(train_cfg, "engine", "autograd")
    if engine not in ENGINES:
        raise ConfigError(f"train.engine: {engine!r} is not one of {', '.join(ENGINES)}")
    if engine == "autograd":
        if getattr(train_cfg, "fused", False):
            raise ConfigError("train.fused: true needs train.engine: sparse (the closed-form MF-BPR step)")
        return
    if model_kind != "mf":
        raise ConfigError(f"train.engine: {engine} trains model.kind mf only, not {model_kind!r}; "
                          f"use train.engine: autograd")
    if engine == "native":
        _check_native(train_cfg)
        return
    denoise = getattr(train_cfg, "denoise", None)
    kind = getattr(denoise, "kind", "bpr")
    if kind not in SPARSE_DENOISE:
        raise ConfigError(f"train.engine: sparse implements plain BPR and PLD only, not "
                          f"train.denoise.kind {kind!r}; use train.engine: autograd for {kind}")
    if train_cfg.optimizer not in SPARSE_OPTIMIZERS:
        raise ConfigError(f"train.engine: sparse supports train.optimizer sgd, adam or adamw (lazy, "
                          f"SparseAdam semantics; adamw without weight decay is adam), not "
                          f"{train_cfg.optimizer!r}")
    if float(train_cfg.weight_decay) != 0.0:
        raise ConfigError(f"train.engine: sparse needs train.weight_decay: 0 (a decay of every row "
                          f"on every step is not row-sparse; regularise with model.reg), got "
                          f"{train_cfg.weight_decay}")
    if getattr(train_cfg, "fused", False) and train_cfg.optimizer != "sgd":
        raise ConfigError(f"train.fused: true needs train.optimizer: sgd (the compiled step is SGD's), got "
                          f"{train_cfg.optimizer!r}")
    if int(getattr(train_cfg, "workers", 0)) > 1:
        raise ConfigError(f"train.engine: sparse trains in one process (train.workers 0 or 1), not "
                          f"{train_cfg.workers} data-parallel workers")


def _check_native(train_cfg) -> None:
    """``train.engine: native`` (:mod:`.native_bpr`): plain BPR, SGD, one negative, CPU, one process."""
    kind = getattr(getattr(train_cfg, "denoise", None), "kind", "bpr")
    if kind != "bpr":
        raise ConfigError(f"train.engine: native implements plain BPR only, not train.denoise.kind {kind!r}; "
                          f"use train.engine: sparse (pld) or autograd")
    if train_cfg.optimizer != "sgd":
        raise ConfigError(f"train.engine: native steps with train.optimizer: sgd only, not {train_cfg.optimizer!r}; "
                          f"use train.engine: sparse for lazy Adam")
    if float(train_cfg.weight_decay) != 0.0:
        raise ConfigError(f"train.engine: native needs train.weight_decay: 0 (regularise with model.reg), got "
                          f"{train_cfg.weight_decay}")
    if int(getattr(train_cfg, "num_negatives", 1)) != 1:
        raise ConfigError(f"train.engine: native draws one negative per row, not train.num_negatives "
                          f"{train_cfg.num_negatives}")
    if getattr(train_cfg, "fused", False):
        raise ConfigError("train.fused: true is the compiled sparse step (train.engine: sparse), not for "
                          "train.engine: native")
    if int(getattr(train_cfg, "workers", 0)) > 1:
        raise ConfigError(f"train.engine: native trains in one process (train.workers 0 or 1), not "
                          f"{train_cfg.workers} data-parallel workers")
    if getattr(train_cfg, "use_gpu", False) or str(getattr(train_cfg, "device", "auto")).startswith("cuda"):
        raise ConfigError("train.engine: native runs on the CPU; use train.engine: sparse on a GPU")


class FastNegativeSampler(NegativeSampler):
    """:class:`~.models.mf.NegativeSampler` with the same draws and the same negatives, found
    with a few loads per draw instead of a global binary search.

    The parent maps a uniform rank ``r`` in ``[0, free_u)`` to the r-th non-positive item
    ``r + #{j : key_j <= u * n_items + r}`` with one ``searchsorted`` over all training keys
    (sorted; user u's lie in ``[u * n_items, (u + 1) * n_items)``): ~20 dependent cache misses
    per draw. Here each user with ``c`` positives has a directory of ``c`` buckets of equal width
    over ``[0, free_u)``; ``dir[b]`` is the position of u's first key ``>= u * n_items +
    ceil(b * free_u / c)``. A draw looks up its bucket ``b = r * c // free_u`` and walks
    ``SCAN`` keys forward from there; whatever is still left to walk (a bucket holding several
    keys below ``r``; rare: the expected walk is under one key whatever the item ids) finishes
    with a branchless binary search of ``bit_length(max c)`` steps on those draws only. Exact:
    the same count as the parent's ``searchsorted``, so the same negatives.
    """

    SCAN = 2

    def padding(self, train: Interactions) -> tuple[int, int]:
        """One sentinel slot before the keys; after them one and room for the longest walk
        (``2^bit_length(max c)`` with ``c <= n_items``) plus ``SCAN``."""
        return 1, 1 + (1 << int(train.n_items).bit_length()) + self.SCAN

    def __init__(self, train: Interactions, device: torch.device):
        super().__init__(train, device)
        free = self.free.cpu().numpy()
        counts = self.n_items - free
        self.levels = int(counts.max()).bit_length() if len(counts) else 0
        n = len(self.qkeys)
        start = self.start.cpu().numpy()
        qkeys = self.qkeys.cpu().numpy()
        n_items = np.int64(self.n_items)
        # the bucket directory, one entry per training key (bucket b of the key's user), built in
        # chunks of keys (bounded temporaries); positions fit int32 below 2^31 keys
        directory = np.empty(n, dtype=np.int32 if n + len(self.keys_buffer) < 2 ** 31 else np.int64)
        # the keys kept: the user's own part q - u * n_items = i - rank, in [0, n_items): int32
        # (4 bytes a row instead of 8), a walk bounded by the user's end instead of by the next
        # user's larger keys. shifted[x] = local[x - 1]; sentinels around (room for any walk).
        shifted = np.empty(len(self.keys_buffer), dtype=np.int32 if n_items < 2 ** 31 else np.int64)
        assert len(shifted) >= n + 2 + (1 << self.levels) + self.SCAN
        for a in range(0, n, self.CHUNK):
            q = qkeys[a:a + self.CHUNK]
            u = q // n_items                 # q = u * n_items + (i - rank), i - rank < n_items
            b = np.arange(a, a + len(u), dtype=np.int64) - start[u]
            lower = (b * free[u] + counts[u] - 1) // np.maximum(counts[u], 1)   # ceil(b f / c)
            directory[a:a + len(u)] = np.searchsorted(qkeys, u * n_items + lower, side="left")
            shifted[1 + a:1 + a + len(u)] = q - u * n_items
        info = np.iinfo(shifted.dtype)
        shifted[0] = info.min
        shifted[n + 1:] = info.max
        del self.keys_buffer, qkeys
        self.qkeys = None       # (the parent's global keys: not kept)
        self.shifted = torch.from_numpy(shifted).to(device)
        self.count = torch.as_tensor(counts, device=device)
        self.end = self.start + self.count
        self.dir = torch.as_tensor(directory, device=device)

    def sample(self, users: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        u = users[:, None].expand(-1, n).reshape(-1)
        rand = torch.rand((len(users), n), generator=generator, dtype=torch.float64).to(users.device).view(-1)
        free = _lookup(self.free, u)
        r = torch.minimum((rand * free.clamp_min(1)).long(), (free - 1).clamp_min(0))
        query = r.to(self.shifted.dtype)       # compared with the user's own keys i - rank
        start = _lookup(self.start, u)
        end = _lookup(self.end, u)
        count = _lookup(self.count, u)
        has = (count > 0) & (free > 0)
        b = (r * count).div_(free.clamp_min(1), rounding_mode="floor")
        entry = torch.where(has, start + b, 0)
        pos = torch.where(has, _lookup(self.dir, entry).long(), start)
        nxt = torch.empty(pos.shape, dtype=self.shifted.dtype, device=pos.device)
        ok = torch.empty(pos.shape, dtype=torch.bool, device=pos.device)
        inside = torch.empty(pos.shape, dtype=torch.bool, device=pos.device)
        for _ in range(self.SCAN):
            torch.index_select(self.shifted, 0, pos + 1, out=nxt)
            torch.le(nxt, query, out=ok)
            ok &= torch.lt(pos, end, out=inside)
            pos.add_(ok)
        torch.index_select(self.shifted, 0, pos + 1, out=nxt)
        torch.le(nxt, query, out=ok)
        left = (ok & torch.lt(pos, end, out=inside)).nonzero().view(-1)
        if len(left):   # keys still to walk: binary search from pos on those draws only
            p, q, e = pos.index_select(0, left), query.index_select(0, left), end.index_select(0, left)
            for s in reversed(range(self.levels)):
                c = p + (1 << s)
                p.add_(torch.le(_lookup(self.shifted, c), q) & (c <= e), alpha=1 << s)
            pos.index_copy_(0, left, p)
        neg = r.add_(pos).sub_(start)
        out = torch.where(free > 0, neg, (rand * self.n_items).long())
        return out.view(len(users), n)


def _lookup(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return table.index_select(0, idx.reshape(-1)).view(idx.shape)


def _openmp() -> bool:
    return "OpenMP" in torch.__config__.parallel_info().split("ATen parallel backend:")[-1]


def _prefetched(make, threads: int, depth: int = 2):
    """Iterate ``make()`` in a producer thread (one intra-op thread) ``depth`` items ahead, the
    consumer on ``threads - 1`` intra-op threads; OpenMP's thread count is per calling thread,
    and a new thread takes the global count at its first parallel op, hence the order below."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    ready, stop = threading.Event(), threading.Event()
    done = object()

    def run():
        try:
            torch.get_num_threads()          # take the current global count (1) for this thread
            ready.set()
            for item in make():
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:          # handed to the consumer
            ready.set()
            q.put(e)

    torch.set_num_threads(1)
    worker = threading.Thread(target=run, name="recval-bpr-batches", daemon=True)
    try:
        worker.start()
        ready.wait()
        torch.set_num_threads(max(1, threads - 1))
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()
        torch.set_num_threads(threads)


class SparseRowOptimizer:
    """A row-sparse optimiser over 2-D tables. :meth:`step` gets, per table, the rows touched
    (with repeats) and their gradient rows *already scaled by* :attr:`grad_scale`."""

    grad_scale: float = 1.0

    def step(self, table: int, idx: torch.Tensor, rows: torch.Tensor) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}


class SparseSGD(SparseRowOptimizer):
    """``w[idx] -= lr * grad``: gradient rows arrive scaled by ``-lr`` and are scattered into
    the table directly (``index_add_`` sums repeated rows)."""

    def __init__(self, tables: list[torch.Tensor], lr: float):
        self.tables, self.lr = tables, float(lr)
        self.grad_scale = -self.lr

    def step(self, table: int, idx: torch.Tensor, rows: torch.Tensor) -> None:
        self.tables[table].index_add_(0, idx, rows)


class SparseAdam(SparseRowOptimizer):
    """Lazy Adam with ``torch.optim.SparseAdam``'s update (see the module docstring).

    Per table: a dense gradient accumulator (zero outside a step), the moments ``[m | v]`` in
    one ``[rows, 2 * dim]`` table (one gather per step) and a step count. A step sums the
    gradient rows into the accumulator, gathers the accumulated rows for every occurrence of a
    touched row, updates moments and weights of each occurrence from the same old values, and
    writes them back with ``index_copy_`` (repeats write identical values, so the result does
    not depend on the write order), then zeroes the accumulator's touched rows. No sort, no
    ``unique``.
    """

    def __init__(self, tables: list[torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.tables, self.lr, self.eps = tables, float(lr), float(eps)
        self.b1, self.b2 = (float(b) for b in betas)
        self.acc = [torch.zeros_like(t) for t in tables]
        self.moments = [torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device) for t in tables]
        self.steps = [0 for _ in tables]
        self._buf: dict = {}

    def _buffers(self, table: int, n: int, d: int, like: torch.Tensor):
        have = self._buf.get(table)
        if have is None or have[0].shape[0] < n:
            have = (torch.empty(n, d, dtype=like.dtype, device=like.device),
                    torch.empty(n, 2 * d, dtype=like.dtype, device=like.device),
                    torch.empty(n, d, dtype=like.dtype, device=like.device))
            self._buf[table] = have
        return tuple(b[:n] for b in have)

    def step(self, table: int, idx: torch.Tensor, rows: torch.Tensor) -> None:
        w, acc, mom = self.tables[table], self.acc[table], self.moments[table]
        self.steps[table] += 1
        t = self.steps[table]
        d = w.shape[1]
        g, mv, p = self._buffers(table, len(idx), d, w)
        acc.index_add_(0, idx, rows)
        torch.index_select(acc, 0, idx, out=g)
        acc.index_fill_(0, idx, 0.0)
        torch.index_select(mom, 0, idx, out=mv)
        torch.index_select(w, 0, idx, out=p)
        m, v = mv[:, :d], mv[:, d:]
        # SparseAdam: m += (1 - b1) (g - m); v += (1 - b2) (g^2 - v)
        m.lerp_(g, 1.0 - self.b1)
        v.mul_(self.b2).addcmul_(g, g, value=1.0 - self.b2)
        step_size = self.lr * math.sqrt(1.0 - self.b2 ** t) / (1.0 - self.b1 ** t)
        torch.sqrt(v, out=g).add_(self.eps)
        p.addcdiv_(m, g, value=-step_size)
        w.index_copy_(0, idx, p)
        mom.index_copy_(0, idx, mv)

    def state_dict(self) -> dict:
        return {"steps": list(self.steps), "moments": [m.clone() for m in self.moments]}


def make_sparse_optimizer(kind: str, tables: list[torch.Tensor], lr: float) -> SparseRowOptimizer:
    """``sgd`` or lazy ``adam``; ``adamw`` is accepted as ``adam`` because the engine requires
    ``train.weight_decay: 0`` (:func:`check_engine`), where AdamW and Adam coincide."""
    if kind == "sgd":
        return SparseSGD(tables, lr)
    if kind in ("adam", "adamw"):
        return SparseAdam(tables, lr)
    raise ConfigError(f"train.engine: sparse supports train.optimizer sgd, adam or adamw, not {kind!r}")


def fused_sgd_step(Wu: torch.Tensor, Wi: torch.Tensor, users: torch.Tensor, items: torch.Tensor,
                   lr: float, reg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One MF-BPR SGD step in whole-tensor form, for ``torch.compile`` to fuse into a few loops
    (gather, score, gradient and scatter-add without the eager step's intermediate tables).
    ``items [1 + n, B]``: the positives, then each column of negatives. With ``s_k =
    sigmoid(-x_k) lr / (n B)``, ``x_k = p_u . (q_i - q_jk)`` and ``rho = lr reg / B``::

        p_u  += sum_k s_k (q_i - q_jk) - rho p_u
        q_i  += (sum_k s_k) p_u        - rho q_i
        q_jk += -s_k p_u               - rho q_jk / n

    (the SGD step on :mod:`.models.mf`'s loss, as :meth:`SparseBPRTask.train_step`; every gradient
    from the weights before the step, summed over a row's occurrences). Returns ``(loss,
    per-example losses)``."""
    n = items.shape[0] - 1
    B = users.shape[0]
    pu = Wu[users]
    q = Wi[items]
    diff = q[:1] - q[1:]                                             # [n, B, d]
    x = (pu[None] * diff).sum(-1)                                    # [n, B]
    per = torch.nn.functional.softplus(-x).mean(0)
    s = torch.sigmoid(-x) * (lr / (n * B))
    rho = lr * reg / B
    Wu.index_add_(0, users, (s[:, :, None] * diff).sum(0) - rho * pu)
    Wi.index_add_(0, items[0], s.sum(0)[:, None] * pu - rho * q[0])
    Wi.index_add_(0, items[1:].reshape(-1), (-s[:, :, None] * pu[None] - (rho / n) * q[1:]).reshape(n * B, -1))
    loss = per.mean() + reg * (pu.square().sum() + q[0].square().sum() + q[1:].square().sum() / n) / (2 * B)
    return loss, per


_COMPILED: dict = {}


def compiled_sgd_step():
    """:func:`fused_sgd_step` compiled by ``torch.compile`` (static shapes: one compilation per
    batch shape and thread count, tens of seconds the first time, then from Inductor's on-disk
    cache); ``None`` once compiling failed on this machine (no C++ compiler)."""
    if "step" not in _COMPILED:
        _COMPILED["step"] = torch.compile(fused_sgd_step, dynamic=False)
    return _COMPILED["step"]


def _compile_failed(e: BaseException) -> None:
    import logging
    logging.getLogger("recval_ray").warning(
        "train.fused: torch.compile failed (%s: %s); training with the eager sparse step",
        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    _COMPILED["step"] = None


class SparseBPRTask(BPRTask):
    """:class:`~.models.mf.BPRTask` (plain BPR or PLD, MF) trained by closed-form row-sparse steps.

    Same batches as the parent (same sampler, same generator stream, same negatives). The
    trainer calls :meth:`train_step` instead of ``loss`` + backward + optimiser. Buffers are
    allocated once for ``batch_size`` rows; the returned loss and per-example losses are views
    of them, valid until the next step (the trainer consumes them at once).
    """

    sampler_class = FastNegativeSampler

    def __init__(self, model, train: Interactions, batch_size: int, reg: float, num_negatives: int = 1,
                 sampler: str = "interactions", *, optimizer: str = "adam", lr: float = 1e-3,
                 denoise: Optional[DenoiseConfig] = None, fused: bool = False):
        if denoise is not None and denoise.kind not in SPARSE_DENOISE:
            raise ConfigError(f"train.engine: sparse implements plain BPR and PLD only, not "
                              f"train.denoise.kind {denoise.kind!r}; use train.engine: autograd")
        super().__init__(model, train, batch_size, reg, num_negatives, sampler,
                         denoise=denoise if denoise is not None and denoise.kind == "pld" else None)
        self.fused = bool(fused)
        if self.fused and optimizer != "sgd":
            raise ConfigError(f"train.fused: true needs train.optimizer: sgd, got {optimizer!r}")
        self.prefetch = True
        self.Wu = model.user_emb.weight.detach()
        self.Wi = model.item_emb.weight.detach()
        self.opt = make_sparse_optimizer(optimizer, [self.Wu, self.Wi], lr)
        B, n, d = batch_size, max(1, int(num_negatives)), self.Wu.shape[1]
        dev, dt = self.device, self.Wu.dtype
        self._n = n
        # flat buffers, viewed per batch as contiguous [.., b, ..] tensors (a last, smaller batch
        # takes a prefix): IJ holds the item rows in blocks q_i, q_j1, .., q_jn
        self._flat = {name: torch.empty(size, dtype=torch.int64 if name == "iidx" else dt, device=dev)
                      for name, size in (("iidx", (1 + n) * B), ("U", B * d), ("IJ", (1 + n) * B * d),
                                         ("D", B * d), ("GU", B * d), ("sc", (1 + n) * B), ("x", n * B),
                                         ("c", (1 + n) * B), ("sp", n * B), ("per", B))}
        self._loss = torch.zeros((), dtype=dt, device=dev)
        # the L2 weights of the item blocks: 1 for the positive, 1/n for each negative
        self._rvec = torch.tensor([1.0] + [1.0 / n] * n, dtype=dt, device=dev)

    def without_examples(self, batch: dict, keep: torch.Tensor) -> dict:
        out = super().without_examples({k: v for k, v in batch.items() if k != "items"}, keep)
        return out          # "items" (positives then negatives, transposed) is rebuilt by the step

    def _buf(self, name: str, *shape: int) -> torch.Tensor:
        return self._flat[name][:math.prod(shape)].view(shape)

    def batches(self, epoch: int, generator: torch.Generator):
        """The epoch's batches; with ``torch.get_num_threads() >= 2`` (OpenMP backend) drawn one
        chunk ahead by a producer thread on one intra-op thread while the steps run on the rest
        (the total stays ``torch.get_num_threads()``; restored after the epoch). The producer
        alone advances ``generator`` and the steps take the batches in order: the same batches
        and the same weights as without it."""
        threads = torch.get_num_threads()
        if not self.prefetch or threads < 2 or not _openmp():
            yield from super().batches(epoch, generator)
            return
        per_chunk = max(1, CHUNK_ROWS // self.batch_size)   # a chunk is drawn at once: buffer two
        yield from _prefetched(lambda: super(SparseBPRTask, self).batches(epoch, generator), threads,
                               depth=2 * per_chunk)

    def _batches(self, epoch: int, generator: torch.Generator):
        """The parent's batches; with the interactions sampler drawn a chunk of ~``CHUNK_ROWS``
        rows (whole batches) at a time: one gather and one negative draw per chunk instead of
        per batch, the same generator calls in the same order (``torch.rand`` of a chunk equals
        the concatenation of its batches' draws), so the same batches."""
        if self.sampler_kind != "interactions":
            yield from super()._batches(epoch, generator)
            return
        B = self.batch_size
        chunk = max(1, CHUNK_ROWS // B) * B
        perm = self.visit_order(generator)
        for c in range(0, len(perm), chunk):
            idx = perm[c:c + chunk].long()
            users = self.users.index_select(0, idx).long()
            pos = self.items.index_select(0, idx).long()
            neg = self.negatives.sample(users, self.num_negatives, generator)
            for s in range(0, len(idx), B):
                p, q = pos[s:s + B], neg[s:s + B]
                # the step's item rows, positives then each negative, drawn here (producer thread)
                yield {"idx": idx[s:s + B], "user": users[s:s + B], "pos": p, "neg": q,
                       "items": torch.cat([p[None], q.T])}

    @torch.no_grad()
    def train_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One BPR step on ``batch`` (``user [B]``, ``pos [B]``, ``neg [B, n]``; optional
        ``items [1 + n, B]`` = the positives, then each column of negatives): updates the model's
        tables in place; returns ``(loss, per-example losses)`` as :meth:`loss` would.

        Item rows in blocks ``IJ [1 + n, B, d]`` (positive, negatives); ``x_k = s_ui - s_ujk``;
        ``e_k = scale * g_k / (n B)``; coefficients ``c = (sum_k e_k, -e_1, .., -e_n)``: user rows
        ``sum_k c_k IJ_k + rho p_u`` (one negative: ``e (q_i - q_j)``, reusing ``q_i - q_j`` of
        the scores), item rows ``c_k p_u + rho_k q_k`` written over ``IJ``.
        """
        users = batch["user"]
        B, n = users.shape[0], self._n
        d = self.Wu.shape[1]
        picked, pos, items = None, batch["pos"], batch.get("items")
        if "pool" in batch:     # PLD: the positive of each slot chosen from its pool first
            picked = {}
            pos = choose_positive(self.Wu, self.Wi, users, pos, batch["neg"], self.pld_chooser(batch, picked))
            batch["idx"] = batch["pool"].gather(1, picked["col"][:, None]).squeeze(1)
            items = None
        if items is None:
            items = torch.cat([pos[None], batch["neg"].view(B, n).T], out=self._buf("iidx", 1 + n, B))
        iidx = items.reshape(-1)
        if self.fused and B == self.batch_size:      # (a last, smaller batch: the eager step below)
            step, out = compiled_sgd_step(), None
            if step is not None:
                try:        # compiles on the first call (before any weight changes)
                    loss, out = step(self.Wu, self.Wi, users, items, self.opt.lr, self.reg)
                except Exception as e:          # noqa: BLE001 - no compiler here: the eager step
                    _compile_failed(e)
            if out is not None:
                per = self._buf("per", B)
                per.copy_(out)
                if picked is not None:
                    self.stats.update(pool_loss=picked["pool_loss"], chosen_loss=per.mean())
                return loss, per
            self.fused = False
        U, IJ = self._buf("U", B, d), self._buf("IJ", 1 + n, B, d)
        torch.index_select(self.Wu, 0, users, out=U)
        torch.index_select(self.Wi, 0, iidx, out=IJ.view((1 + n) * B, d))
        x, c, sp = self._buf("x", n, B), self._buf("c", 1 + n, B), self._buf("sp", n, B)
        per, GU = self._buf("per", B), self._buf("GU", B, d)
        if n == 1:
            D = self._buf("D", B, d)
            torch.sub(IJ[0], IJ[1], out=D)                                      # q_i - q_j
            torch.bmm(D[:, None, :], U[:, :, None], out=x.view(B, 1, 1))        # x = s_ui - s_uj
        else:
            sc = self._buf("sc", 1 + n, B)
            for k in range(1 + n):
                torch.bmm(IJ[k][:, None, :], U[:, :, None], out=sc[k].view(B, 1, 1))
            torch.sub(sc[:1], sc[1:], out=x)
        # per-example loss softplus(-x) (mean over the negatives) and the loss the trainer logs
        torch.neg(x, out=sp)
        torch._C._nn.softplus(sp, 1, 20, out=sp)                               # F.softplus, out=
        torch.mean(sp, 0, out=per)
        loss = torch.mean(per, out=self._loss)
        reg = self.reg
        if reg:
            l2 = (torch.linalg.vector_norm(U).square() + torch.linalg.vector_norm(IJ[0]).square()
                  + torch.linalg.vector_norm(IJ[1:]).square() / n) / (2 * B)
            loss = loss + reg * l2
        # e = scale * g / (n B), g = -sigmoid(-x); c = (sum_k e_k, -e_1..-e_n); rho = scale * reg / B
        scale = self.opt.grad_scale
        ce = c[1:]
        torch.neg(x, out=ce)
        torch.sigmoid(ce, out=ce)
        ce.mul_(scale / (n * B))                                                # -e
        torch.sum(ce, 0, keepdim=True, out=c[:1]).neg_()                        # sum_k e_k
        rho = scale * reg / B
        if n == 1:
            torch.mul(D, c[0][:, None], out=GU)                                # e (q_i - q_j)
        else:
            torch.mul(IJ[0], c[0][:, None], out=GU)
            for k in range(1, 1 + n):
                GU.addcmul_(IJ[k], c[k][:, None])
        if reg:
            GU.add_(U, alpha=rho)
            IJ.mul_((self._rvec * rho)[:, None, None])
            IJ.addcmul_(c[:, :, None], U[None])
        else:
            torch.mul(c[:, :, None], U[None], out=IJ)
        self.opt.step(0, users, GU)
        self.opt.step(1, iidx, IJ.view((1 + n) * B, d))
        if picked is not None:
            self.stats.update(pool_loss=picked["pool_loss"], chosen_loss=per.mean())
        return loss, per


def build_sparse_mf(opts, train: Interactions, train_cfg, device: str = "auto") -> SparseBPRTask:
    """``model.kind: mf`` with ``train.engine: sparse``: the MF model, row-sparse steps."""
    from .models.base import resolve_device
    from .models.mf import MF
    check_engine(train_cfg, "mf")
    dev = resolve_device(device)
    model = MF(train.n_users, train.n_items, opts.dim, opts.init_std, opts.init).to(dev)
    return SparseBPRTask(model, train, train_cfg.batch_size, opts.reg, train_cfg.num_negatives, opts.sampler,
                         optimizer=train_cfg.optimizer, lr=train_cfg.lr, denoise=getattr(train_cfg, "denoise", None),
                         fused=getattr(train_cfg, "fused", False))


MODELS.register_engine("mf", "sparse", build_sparse_mf)
