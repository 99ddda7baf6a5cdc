"""Denoising training objectives for BPR: PLD, T-CE and R-CE (``train.denoise``).

All three change how :class:`~.models.mf.BPRTask` (MF, LightGCN) turns a batch into a loss;
``kind: bpr`` (the default) is plain BPR. With ``l(u, i, j) = softplus(s_uj - s_ui)`` and
``reg * l2`` the task's L2 term:

* ``pld``: Personalized Loss Distribution (Zhang et al., WWW 2025). After ``warmup_epochs``
  epochs of plain BPR, each batch slot draws a user u uniformly among users with training
  interactions, a pool of ``pool`` = k of u's training positives (uniform, without
  replacement when u has >= k, with replacement otherwise) and one negative j shared by the
  pool, and trains on ONE candidate drawn with

      P(i) = exp(-l(u, i, j) / tau) / sum_{i' in pool} exp(-l(u, i', j) / tau)

  (high-loss, likely noisy, positives are rarely picked; ``tau -> inf`` is uniform).
* ``tce``: Truncated loss (Wang et al., WSDM 2021). Each batch drops its ``ceil(rate * B)``
  largest-loss examples, ``rate = drop_rate * min(t / num_gradual, 1)`` at iteration t
  (batches trained so far, counted across epochs from 0), and averages over the kept ones.
* ``rce``: Reweighted loss (Wang et al., WSDM 2021), the positive-weight of R-CE carried to
  BPR: ``mean_b w_b l_b`` with ``w_b = sigmoid(s_ui)^alpha``, the weight detached.

The functions below are pure tensor maths (no model), tested alone. torch is imported inside
them: :mod:`recval_ray.config` imports :class:`DenoiseConfig`, and loading a job file
should not pay for torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional

if TYPE_CHECKING:  # pragma: no cover
    import torch

DENOISE_KINDS = ("bpr", "pld", "tce", "rce")


@dataclass
class DenoiseConfig:
    """``train.denoise``: the BPR training objective of MF / LightGCN.

    ``kind``: ``bpr`` (plain), ``pld``, ``tce`` or ``rce``. PLD: ``warmup_epochs`` plain-BPR
    epochs first (same user sampler), ``pool`` = candidate pool size k, ``tau`` = softmax
    temperature. T-CE: ``drop_rate`` = the largest fraction of a batch dropped, reached
    linearly after ``num_gradual`` iterations (0 = from the start). R-CE: ``alpha`` = the
    weight exponent (0 = plain BPR).
    """
    kind: Literal["bpr", "pld", "tce", "rce"] = "bpr"
    warmup_epochs: int = 5
    pool: int = 5
    tau: float = 0.1
    drop_rate: float = 0.2
    num_gradual: int = 30000
    alpha: float = 0.2

    def validate(self, key: str = "train.denoise") -> None:
        """Raise ``ValueError`` naming the dotted key of the first bad value."""
        if self.kind not in DENOISE_KINDS:
            raise ValueError(f"{key}.kind: {self.kind!r} is not one of {', '.join(DENOISE_KINDS)}")
        if self.warmup_epochs < 0:
            raise ValueError(f"{key}.warmup_epochs: {self.warmup_epochs} must be >= 0")
        if self.pool < 1:
            raise ValueError(f"{key}.pool: {self.pool} must be >= 1")
        if not self.tau > 0 or math.isinf(self.tau):
            raise ValueError(f"{key}.tau: {self.tau} must be > 0 (and finite)")
        if not 0 <= self.drop_rate < 1:
            raise ValueError(f"{key}.drop_rate: {self.drop_rate} must be in [0, 1)")
        if self.num_gradual < 0:
            raise ValueError(f"{key}.num_gradual: {self.num_gradual} must be >= 0")
        if not 0 <= self.alpha < math.inf:
            raise ValueError(f"{key}.alpha: {self.alpha} must be >= 0 (and finite)")


# ---------------------------------------------------------------------------------------
# PLD
# ---------------------------------------------------------------------------------------
def pld_choice(losses: "torch.Tensor", valid_mask: Optional["torch.Tensor"], tau: float,
               generator: Optional["torch.Generator"] = None, *,
               uniforms: Optional["torch.Tensor"] = None) -> "torch.Tensor":
    """One column per row of ``losses [B, k]``, drawn with ``P(c) ∝ exp(-losses[b, c] / tau)``
    over the columns where ``valid_mask [B, k]`` is true (``None``: all).

    Gumbel-max: ``argmax_c(-l_c / tau + g_c)``, ``g_c = -log(-log U_c)``, ``U`` uniform
    ``[B, k]`` float64 drawn from the CPU ``generator`` (or given as ``uniforms``, on any device)
    then moved to ``losses.device``: a deterministic function of the generator, no host sync.
    A row without a valid column gets column 0.
    """
    import torch

    if uniforms is None:
        uniforms = torch.rand(losses.shape, generator=generator, dtype=torch.float64)
    u = uniforms.to(device=losses.device, dtype=torch.float64).clamp_min(1e-300)
    logits = losses.detach().double() / (-float(tau)) - torch.log(-torch.log(u))
    if valid_mask is not None:
        logits = logits.masked_fill(~valid_mask.to(device=losses.device, dtype=torch.bool), -math.inf)
    return logits.argmax(dim=1)


def pld_pool_offsets(counts: "torch.Tensor", k: int, uniforms: "torch.Tensor",
                     some_small: bool = True) -> "torch.Tensor":
    """``[B, k]`` offsets into each slot's list of ``counts[b]`` (>= 1) positives.

    ``counts[b] >= k``: k DISTINCT offsets, a uniform k-subset of ``[0, n)``, by Floyd's
    algorithm vectorised over slots (a loop over the k positions only): for
    ``j = n-k, ..., n-1`` draw ``t`` uniform in ``[0, j]`` and take ``t``, or ``j`` when ``t``
    was taken already. ``counts[b] < k``: k offsets uniform with replacement (the PLD code's
    "without replacement when possible"). ``uniforms [B, k]``: float64 in [0, 1), one per
    position; the order of the k offsets within a row is not uniform (PLD's choice does not
    depend on it). ``some_small=False`` promises every count is >= k (skips that branch).
    """
    import torch

    n = counts.long()
    u = uniforms.to(device=n.device, dtype=torch.float64)
    # columns as contiguous [B] rows of a [k, B] layout: strided [B, p] compares are slow
    j = n[None, :] - k + torch.arange(k, device=n.device)[:, None]          # [k, B]: n-k .. n-1
    t = torch.minimum((u.T * (j + 1).clamp_min(1)).long(), j.clamp_min(0)).contiguous()
    cols = [t[0]]
    for p in range(1, k):
        dup = cols[0] == t[p]
        for c in cols[1:]:
            dup |= c == t[p]
        cols.append(torch.where(dup, j[p], t[p]))
    out = torch.stack(cols, 1)
    if not some_small:
        return out
    repl = torch.minimum((u * n[:, None]).long(), n[:, None] - 1)
    return torch.where(n[:, None] >= k, out, repl)


# ---------------------------------------------------------------------------------------
# T-CE
# ---------------------------------------------------------------------------------------
def tce_drop_rate(iteration: int, drop_rate: float, num_gradual: int) -> float:
    """``drop_rate * min(iteration / num_gradual, 1)`` (``num_gradual = 0``: ``drop_rate``)."""
    if num_gradual <= 0:
        return float(drop_rate)
    return float(drop_rate) * min(float(iteration) / float(num_gradual), 1.0)


def tce_keep_count(n: int, rate: float) -> int:
    """Examples kept of ``n``: ``n - ceil(rate * n)``, DenoisingRec's ``int(n * (1 - rate))``
    without its float round-off (``rate * n`` rounded to 9 decimals first), and at least one
    when ``n > 0`` (so the mean is defined)."""
    if n <= 0:
        return 0
    drop = math.ceil(round(float(rate) * n, 9))
    return max(1, n - drop)


def tce_keep_mask(losses: "torch.Tensor", rate: float) -> "torch.Tensor":
    """Boolean ``[B]``: the :func:`tce_keep_count` smallest ``losses``; among equal losses the
    earlier batch position is kept first (stable sort). No host sync (the count is a Python
    int from the shape)."""
    import torch

    n = losses.shape[0]
    keep = tce_keep_count(n, rate)
    mask = torch.zeros(n, dtype=torch.bool, device=losses.device)
    if keep >= n:
        return mask.fill_(True)
    order = torch.sort(losses.detach(), stable=True).indices
    mask[order[:keep]] = True
    return mask


# ---------------------------------------------------------------------------------------
# R-CE
# ---------------------------------------------------------------------------------------
def rce_weights(pos_scores: "torch.Tensor", alpha: float) -> "torch.Tensor":
    """``sigmoid(s_pos)^alpha``, detached (the weight takes no gradient)."""
    import torch

    return torch.sigmoid(pos_scores.detach()).pow(float(alpha))
