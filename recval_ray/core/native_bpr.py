"""MF-BPR trained by a C kernel (``train.engine: native``): SGD at the speed of ``implicit``.

The kernel (``native/bpr.c``, compiled on first use with the machine's C compiler and OpenMP,
cached per source, flags and CPU) does one batch-synchronous SGD step per call on the loss of
:mod:`.models.mf` (``mean_b softplus(-x_b) + reg * mean_b l2_b``, ``x = p_u . (q_i - q_j)``)::

    s_b = lr / B * sigmoid(-x_b),   rho = lr * reg / B
    p_u += s_b (q_i - q_j) - rho p_u,   q_i += s_b p_u - rho q_i,   q_j += -s_b p_u - rho q_j

with the gradients taken at the rows before the step (as ``train.engine: sparse`` with SGD);
each table row is updated by the one thread that owns it, positives' updates then negatives'
then users', each in batch order, so the result is the same bit for bit whatever the number of
threads (no Hogwild). What differs from ``train.engine: sparse`` (so it is a named engine of
its own, not a faster path to the same numbers):

* the visit order of an epoch is a seeded bijection of the rows computed per position (no
  permutation array: 8 bytes a row less), still each row once an epoch;
* a negative is drawn by rejection (uniform over the user's free items, exactly) from a
  counter-based hash of (epoch seed, training row), not from the torch generator stream; so a
  row's negative does not depend on which other rows share its batch (``drop_rows`` removes
  rows without changing the others' draws);
* an item row's weight decay uses its value when the update is applied (a row twice in a batch
  decays from its once-updated value), so with ``model.reg > 0`` it is not the sparse step.

With ``model.reg: 0`` and the same negatives one step equals :class:`~.fast_bpr.SparseBPRTask`'s
(tested). Supported: ``model.kind: mf``, plain BPR, ``train.optimizer: sgd``, one negative,
the interactions sampler, the CPU, in-process or one Ray Train worker (:func:`~.fast_bpr.check_engine`).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from typing import Optional

import numpy as np
import torch

from .data import Interactions
from .errors import ConfigError
from .models.mf import BPRTask
from .registry import MODELS

log = logging.getLogger("recval_ray")

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native", "bpr.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")
MAX_THREADS = 64            # as in bpr.c
_LIB: dict = {}


def compiler() -> Optional[str]:
    """The C compiler the kernel is built with: ``$CC``, else ``cc`` or ``gcc`` on the PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` builds one library per kind of CPU, so a cache
    on a shared home directory never hands one node's build to another)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def cache_dir() -> str:
    return os.environ.get("RECVAL_NATIVE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "recval_ray", "native")


def load() -> ctypes.CDLL:
    """The compiled kernel (built once per source, flags and CPU; an atomic rename makes
    concurrent builds by several workers safe). Raises :class:`ConfigError` when it cannot be
    built (no C compiler or no OpenMP)."""
    if "lib" in _LIB:
        return _LIB["lib"]
    cc = compiler()
    if cc is None:
        raise ConfigError("train.engine: native compiles a C kernel on first use and found no C compiler "
                          "(set $CC or install gcc); use train.engine: sparse")
    with open(SOURCE, "rb") as fh:
        src = fh.read()
    key = hashlib.sha1(src + " ".join((cc,) + FLAGS).encode() + _cpu_flags().encode()).hexdigest()[:16]
    out_dir = cache_dir()
    try:
        os.makedirs(out_dir, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise PermissionError(out_dir)
    except OSError:         # a read-only home (containers): a private temporary cache instead
        out_dir = os.path.join(tempfile.gettempdir(), f"recval_ray-native-{os.getuid()}")
        os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"bpr-{key}.so")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *FLAGS, "-o", tmp, SOURCE, "-lm"], capture_output=True, text=True)
            if proc.returncode != 0:
                first = (proc.stderr.strip().splitlines() or ["(no message)"])[0]
                raise ConfigError(f"train.engine: native could not compile its C kernel with {cc} "
                                  f"{' '.join(FLAGS)}: {first}; use train.engine: sparse")
            os.replace(tmp, path)
        finally:            # (only this temporary file: nothing else in the cache is touched)
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.debug("train.engine native: compiled %s", path)
    lib = ctypes.CDLL(path)
    P, I64, U64, F, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_float, ctypes.c_int
    lib.recval_bpr_step.argtypes = [P, P, I64, P, P, P, I64, P, P, I64, P, U64, U64, INT, P, F, F,
                                    P, P, P, P, P, P, P, P, P, P, INT]
    lib.recval_bpr_step.restype = None
    lib.recval_visit_rows.argtypes = [U64, I64, I64, I64, P, P, INT]
    lib.recval_visit_rows.restype = None
    lib.recval_sample_negatives.argtypes = [P, P, I64, P, P, I64, P, U64, U64, P, INT]
    lib.recval_sample_negatives.restype = None
    lib.recval_build_filter.argtypes = [P, P, I64, I64, P, U64]
    lib.recval_build_filter.restype = None
    _LIB["lib"] = lib
    return lib


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _threads() -> int:
    return max(1, min(MAX_THREADS, torch.get_num_threads()))


def _seed(generator: torch.Generator) -> int:
    """A 62-bit seed drawn from ``generator`` (the epoch's torch generator)."""
    return int(torch.randint(0, 2 ** 62, (1,), generator=generator))


class UserItemsCSR:
    """Each user's training items, sorted: ``items[indptr[u]:indptr[u + 1]]`` (int32, 4 bytes a
    row; ``indptr`` int64 per user), and a filter of the training pairs (``FILTER_BITS`` bits a
    row, one hashed bit per pair, a power of two in all): the native kernel's negative check
    (the filter skips the binary search for most candidates; the negatives are the same
    without it, ``filter=False``)."""

    FILTER_BITS = 16

    def __init__(self, train: Interactions, filter: bool = True):
        user = np.asarray(train.user)
        order = np.lexsort((np.asarray(train.item), user))
        self.items = torch.from_numpy(np.ascontiguousarray(np.asarray(train.item)[order], dtype=np.int32))
        del order
        indptr = np.zeros(train.n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(user, minlength=train.n_users), out=indptr[1:])
        self.indptr = torch.from_numpy(indptr)
        self.n_items = int(train.n_items)
        self.filter, self.fmask = None, 0
        if filter:
            bits = 64
            while bits < self.FILTER_BITS * len(user):
                bits *= 2
            self.filter = torch.zeros(bits // 64, dtype=torch.int64)
            self.fmask = bits - 1
            u32 = torch.from_numpy(np.ascontiguousarray(user, dtype=np.int32))
            i32 = torch.from_numpy(np.ascontiguousarray(np.asarray(train.item), dtype=np.int32))
            load().recval_build_filter(_ptr(u32), _ptr(i32), len(user), self.n_items, _ptr(self.filter), self.fmask)

    def filter_args(self) -> tuple:
        return (None if self.filter is None else _ptr(self.filter)), self.fmask

    def negatives(self, users: torch.Tensor, keys: torch.Tensor, seed: int) -> torch.Tensor:
        """One negative per ``users[b]`` (int64), drawn by the kernel's sampler from ``(seed,
        keys[b])``: the kernel's own draw when ``keys`` are the training rows of a step."""
        users, keys = users.to(torch.int64).contiguous(), keys.to(torch.int64).contiguous()
        out = torch.empty(len(users), dtype=torch.int64)
        load().recval_sample_negatives(_ptr(users), _ptr(keys), len(users), _ptr(self.indptr), _ptr(self.items),
                                       self.n_items, *self.filter_args(), int(seed), _ptr(out), _threads())
        return out


class NativeNegativeSampler:
    """Negatives uniform over the items outside the user's training rows, drawn by the kernel's
    sampler (rejection plus an exact walk) from a seed taken from the caller's generator; the
    same interface as :class:`~.models.mf.NegativeSampler` (``sample(users, n, generator)``)."""

    def __init__(self, train: Interactions, device: torch.device):
        if torch.device(device).type != "cpu":
            raise ConfigError(f"train.engine: native runs on the CPU, not {device}; use train.engine: sparse")
        self.csr = UserItemsCSR(train)
        self.n_items = self.csr.n_items

    def sample(self, users: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        u = users.reshape(-1, 1).expand(-1, n).reshape(-1)
        return self.csr.negatives(u, torch.arange(len(u)), _seed(generator)).view(len(users), n)


class NativeBatch(dict):
    """A native batch: ``idx`` (training rows) and ``seed`` (the epoch's negative seed), all the
    kernel needs. ``user``, ``pos`` and ``neg [B, 1]`` (what other consumers of a BPR task's
    batches read, e.g. the stacked engines) are filled on first access, the negatives drawn
    exactly as the kernel draws them (same seed, same rows)."""

    def __init__(self, task: "NativeBPRTask", idx: torch.Tensor, seed: int):
        super().__init__(idx=idx, seed=seed)
        self.task = task

    def __missing__(self, key):
        if key not in ("user", "pos", "neg"):
            raise KeyError(key)
        t, idx = self.task, self["idx"].to(torch.int64)
        user = t.users.index_select(0, idx).long()
        self["user"], self["pos"] = user, t.items.index_select(0, idx).long()
        self["neg"] = t.csr.negatives(user, idx, self["seed"]).view(-1, 1)
        return self[key]


class NativeBPRTask(BPRTask):
    """:class:`~.models.mf.BPRTask` (MF, plain BPR, SGD) stepped by the C kernel.

    A batch is ``{"idx": training rows, "seed": the epoch's negative seed}``; the kernel gathers
    the rows' users and items itself. :meth:`train_step` returns ``(loss, per-example losses)``
    as views of preallocated buffers, valid until the next step."""

    sampler_class = NativeNegativeSampler
    #: the trainer hands its per-row loss record (``float32 [n_train]``) to :attr:`row_losses`
    #: and the kernel writes each step's losses there itself (in parallel, prefetched)
    writes_row_losses = True
    row_losses: Optional[torch.Tensor] = None

    def __init__(self, model, train: Interactions, batch_size: int, reg: float, lr: float):
        super().__init__(model, train, batch_size, reg, 1, "interactions")
        load()      # compile now: a missing compiler fails before training starts
        if batch_size >= 2 ** 31 or train.n_items >= 2 ** 31:
            raise ConfigError(f"train.engine native takes batches and item counts below 2^31 "
                              f"(train.batch_size {batch_size}, {train.n_items} items)")
        self.lr = float(lr)
        self.Wu = model.user_emb.weight.detach()
        self.Wi = model.item_emb.weight.detach()
        if not (self.Wu.is_contiguous() and self.Wi.is_contiguous() and self.Wu.dtype == torch.float32):
            raise ConfigError("train.engine: native needs contiguous float32 embedding tables")
        self.csr = self.negatives.csr
        self.users = self.users.to(torch.int32).contiguous()       # the split's codes (no copy when int32)
        self.items = self.items.to(torch.int32).contiguous()
        B, d = batch_size, self.Wu.shape[1]
        self._i64 = {k: torch.empty(B, dtype=torch.int64) for k in ("neg", "U", "I")}
        self._f32 = {k: torch.empty(B, dtype=torch.float32) for k in ("S", "per", "l2")}
        self._P = torch.empty(B, d)
        self._G = torch.empty(B, d)
        self._ws_threads = 0
        self._loss = torch.zeros(())

    def _workspace(self, threads: int):
        if self._ws_threads != threads:
            self._lists = torch.empty(3 * threads * (self.batch_size + threads), dtype=torch.int32)
            self._counts = torch.empty(3 * threads * threads, dtype=torch.int64)
            self._ws_threads = threads
        return self._lists, self._counts

    def without_examples(self, batch: dict, keep: torch.Tensor) -> dict:
        out = NativeBatch(self, batch["idx"][keep].contiguous(), batch["seed"])
        if "neg" in batch:      # (given negatives stay given)
            out["neg"] = batch["neg"][keep]
        return out

    def _batches(self, epoch: int, generator: torch.Generator):
        """The epoch's rows in the kernel's seeded visit order (two seeds drawn from
        ``generator``: the order's and the negatives'), ``batch_size`` at a time."""
        order_seed, neg_seed = _seed(generator), _seed(generator)
        visit = None if self.visit is None else self.visit.to(torch.int64).contiguous()
        n = self.n_train if visit is None else len(visit)
        lib = load()
        for start in range(0, n, self.batch_size):
            b = min(self.batch_size, n - start)
            idx = torch.empty(b, dtype=torch.int64)      # (its own: a caller may keep batches)
            lib.recval_visit_rows(order_seed, n, start, b, None if visit is None else _ptr(visit),
                                  _ptr(idx), _threads())
            yield NativeBatch(self, idx, neg_seed)

    @torch.no_grad()
    def train_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One kernel step on ``batch["idx"]`` (negatives drawn by the kernel, or ``batch["neg"]
        [B]``/``[B, 1]`` when given); returns ``(loss, per-example losses)``."""
        idx = batch["idx"].to(torch.int64).contiguous()
        B = len(idx)
        given = batch.get("neg")
        neg = self._i64["neg"][:B]
        if given is not None:
            neg.copy_(given.reshape(-1))
        threads = _threads()
        lists, counts = self._workspace(threads)
        f, i = self._f32, self._i64
        load().recval_bpr_step(
            _ptr(self.Wu), _ptr(self.Wi), self.Wu.shape[1], _ptr(self.users), _ptr(self.items), _ptr(idx), B,
            _ptr(self.csr.indptr), _ptr(self.csr.items), self.csr.n_items, *self.csr.filter_args(),
            int(batch["seed"]), int(given is None),
            _ptr(neg), self.lr, float(self.reg), _ptr(i["U"]), _ptr(i["I"]), _ptr(f["S"]), _ptr(self._P),
            _ptr(self._G), _ptr(f["per"]), _ptr(f["l2"]),
            None if self.row_losses is None else _ptr(self.row_losses), _ptr(lists), _ptr(counts), threads)
        per = f["per"][:B]
        loss = torch.mean(per, out=self._loss)
        if self.reg:
            loss = loss + self.reg * f["l2"][:B].sum() / (2 * B)
        return loss, per


def build_native_mf(opts, train: Interactions, train_cfg, device: str = "auto") -> NativeBPRTask:
    """``model.kind: mf`` with ``train.engine: native``: the MF model, C kernel steps (CPU)."""
    from .fast_bpr import check_engine
    from .models.mf import MF
    check_engine(train_cfg, "mf")
    if getattr(opts, "sampler", "interactions") != "interactions":
        raise ConfigError(f"train.engine: native visits every training row once an epoch (model.sampler: "
                          f"interactions), not model.sampler {opts.sampler!r}")
    model = MF(train.n_users, train.n_items, opts.dim, opts.init_std, opts.init)
    return NativeBPRTask(model, train, train_cfg.batch_size, opts.reg, train_cfg.lr)


MODELS.register_engine("mf", "native", build_native_mf)
