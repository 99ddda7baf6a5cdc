"""Exact Shapley values by enumerating every coalition (``n <= 14`` players).

    phi_i = sum_{S ⊆ N \\ {i}} w(|S|) (v(S ∪ {i}) - v(S)),      w(s) = s! (n - s - 1)! / n!

Regrouped by coalition, every ``v(T)`` enters ``phi_i`` once: with ``+w(|T| - 1)`` when
``i in T`` and ``-w(|T|)`` when ``i not in T``. With the coalitions as the rows of a 0/1
matrix ``M [2^n, n]`` (row ``c`` = the bits of ``c``) this is two matrix products,

    phi = M^T (v * w_in(|T|)) - (1 - M)^T (v * w_out(|T|)),
    w_in(s) = w(s - 1) (s >= 1),   w_out(s) = w(s) (s <= n - 1),

accumulated over batches of coalitions in float64.
"""
from __future__ import annotations

import math

import torch

from .games import PlayerGame

MAX_EXACT_PLAYERS = 14


def shapley_weights(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_in, w_out)`` indexed by coalition size ``0..n`` (float64): the weight of ``v(T)``
    in ``phi_i`` for ``i in T`` and for ``i not in T`` (0 where undefined)."""
    w = torch.tensor([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n)
                      for s in range(n)], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    return torch.cat([zero, w]), torch.cat([w, zero])


def coalition_masks(n: int, start: int, stop: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Coalitions ``start..stop-1`` of ``n`` players as bool masks ``[stop - start, n]``
    (coalition ``c`` holds player ``j`` iff bit ``j`` of ``c`` is set)."""
    codes = torch.arange(start, stop, device=device, dtype=torch.int64)
    bits = torch.arange(n, device=device, dtype=torch.int64)
    return (codes[:, None] >> bits) & 1 == 1


def exact_shapley(game: PlayerGame, n_players: int, batch_size: int = 4096,
                  device: torch.device | str = "cpu", max_players: int = MAX_EXACT_PLAYERS) -> torch.Tensor:
    """Shapley values ``[n]`` (float64) of ``game`` by enumerating its ``2^n`` coalitions,
    ``batch_size`` coalitions per call of ``game``."""
    n = int(n_players)
    if n > max_players:
        raise ValueError(f"exact enumeration is limited to {max_players} players, got {n}")
    phi = torch.zeros(n, dtype=torch.float64, device=device)
    if n == 0:
        return phi
    w_in, w_out = (w.to(device) for w in shapley_weights(n))
    for start in range(0, 2 ** n, batch_size):
        masks = coalition_masks(n, start, min(2 ** n, start + batch_size), device)
        v = torch.as_tensor(game(masks), device=device).to(torch.float64).reshape(-1)
        if len(v) != len(masks):
            raise ValueError(f"game returned {len(v)} values for {len(masks)} coalitions")
        size = masks.sum(1)
        inside = masks.to(torch.float64)
        phi += inside.T @ (v * w_in[size]) - (1.0 - inside).T @ (v * w_out[size])
    return phi
