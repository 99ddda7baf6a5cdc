"""Shapley values by permutation sampling, with a standard-error stopping rule.

For a uniformly random order ``pi`` of the ``n`` players, the marginal contribution of
player ``i`` is ``v(Pre_pi(i) ∪ {i}) - v(Pre_pi(i))`` (``Pre`` = the players before ``i``);
its expectation over orders is ``phi_i``. One order costs the ``n + 1`` values of its
cumulative coalitions ``C_0 = {} ⊂ C_1 ⊂ ... ⊂ C_n = N``, and the contribution of the player
at position ``t`` is ``v(C_{t+1}) - v(C_t)``: with ``rank[p, i]`` the position of ``i`` in
order ``p``, ``C_t`` is the mask ``rank < t``. ``batch_permutations`` orders are evaluated
per batch (one call of the game on ``batch * (n + 1)`` coalitions).

``antithetic``: every order is paired with its reverse and the pair's mean contribution is
one sample (the reverse puts late players early, so the pair's errors partly cancel).
Per-player sample means and variances are kept online; the estimate stops once at least
``min_permutations`` orders were drawn and the largest standard error
``sqrt(var_i / n_samples)`` is below ``tolerance``, or after ``max_permutations`` orders.
Efficiency holds for every order (the contributions telescope to ``v(N) - v({})``), so the
estimate's total is exact whatever the number of samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .games import PlayerGame


@dataclass
class PermutationEstimate:
    values: torch.Tensor        # [n] float64
    std_errors: torch.Tensor    # [n] float64, standard error of each value
    n_permutations: int         # orders evaluated (reverses included)
    converged: bool             # max standard error < tolerance


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (e.g. ``(seed, stream, index)``)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def permutation_shapley(game: PlayerGame, n_players: int, *, tolerance: float = 1e-3,
                        max_permutations: int = 1000, min_permutations: int = 32,
                        batch_permutations: int = 16, antithetic: bool = True,
                        seed: int = 0, generator: Optional[torch.Generator] = None,
                        device: torch.device | str = "cpu") -> PermutationEstimate:
    """Permutation-sampling estimate of the Shapley values of ``game`` (see the module doc).
    Random orders come from ``generator`` (CPU) or, if None, from one seeded by ``seed``."""
    n = int(n_players)
    gen = generator if generator is not None else seeded_generator(seed)
    zeros = torch.zeros(n, dtype=torch.float64, device=device)
    if n == 0:
        return PermutationEstimate(zeros, zeros.clone(), 0, True)
    per_sample = 2 if antithetic else 1
    batch = max(1, int(batch_permutations) // per_sample)        # samples per batch
    positions = torch.arange(n + 1, device=device)
    total = zeros.clone()
    total_sq = zeros.clone()
    samples = drawn = 0
    se = torch.full((n,), float("inf"), dtype=torch.float64, device=device)
    while drawn < max_permutations:
        b = min(batch, max(1, (max_permutations - drawn) // per_sample))
        order = torch.rand(b, n, generator=gen).argsort(1).to(device)          # [b, n]
        if antithetic:
            order = torch.cat([order, order.flip(1)])
        rank = order.argsort(1)                                                 # position of each player
        masks = rank[:, None, :] < positions[None, :, None]                     # [P, n + 1, n]
        v = torch.as_tensor(game(masks.reshape(-1, n)), device=device).to(torch.float64)
        v = v.reshape(len(order), n + 1)
        step = v[:, 1:] - v[:, :-1]                                             # by position
        contrib = step.gather(1, rank)                                          # by player
        if antithetic:
            contrib = 0.5 * (contrib[:b] + contrib[b:])
        total += contrib.sum(0)
        total_sq += (contrib ** 2).sum(0)
        samples += b
        drawn += b * per_sample
        if samples > 1:
            mean = total / samples
            var = ((total_sq - samples * mean ** 2) / (samples - 1)).clamp_min(0.0)
            se = (var / samples).sqrt()
            if drawn >= min_permutations and float(se.max()) < tolerance:
                break
    return PermutationEstimate(total / max(samples, 1), se, drawn, bool(float(se.max()) < tolerance))
