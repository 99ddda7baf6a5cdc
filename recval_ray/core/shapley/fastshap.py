"""FastSHAP (Jethani et al. 2022): an explainer network that outputs every interaction's
Shapley value in one forward pass, trained on the users' games.

Explainer: an MLP ``phi_theta: x_u in {0,1}^I -> R^I`` (default ``I -> 256 -> 256 -> I``, ReLU),
read only at the user's players ``P_u`` (training items, ``n_u = |P_u|``). Additive efficient
normalisation, inside the graph, makes the values of every user sum to its game's gain:

    phi_u = phi_theta(x_u) + x_u (g_u - x_u . phi_theta(x_u)) / n_u,   g_u = v_u(P_u) - v_u({}).

Loss (the Shapley kernel's weighted least squares, as a sampling expectation): for each user
in a batch, ``samples`` coalitions ``S ⊆ P_u`` with size ``k in 1..n_u-1`` drawn with

    p(k) ∝ 1 / (k (n_u - k)),   then ``S`` uniform among the subsets of size ``k``,

and (``paired``) every second coalition the complement of the first; the loss is the mean of
``(v_u(S) - v_u({}) - sum_{i in S} phi_ui)^2`` over users and coalitions. Users with fewer
than two players have no such coalition and no loss (their one value is ``g_u``).

Training: Adam; every epoch a seeded order of the users, cut into batches of ``batch_size``
users, fresh coalitions per batch; after every epoch the same loss on a fixed seeded set of
``valid_samples`` coalitions per user (values computed once); early stopping after
``patience`` epochs without improvement, the best epoch's weights restored. Every random
choice (initialisation, orders, coalitions) derives from ``seed``; draws happen on the CPU and
move to ``device`` (the results do not depend on the device).

``p(k)`` is drawn exactly without a per-user table: ``1/(k(n-k)) = (1/n)(1/k + 1/(n-k))``, so
``k`` is ``j`` or ``n - j`` with probability 1/2 each, ``j`` drawn with ``p(j) ∝ 1/j`` on
``1..n-1`` by inverting the harmonic numbers ``H_j`` (one shared sorted table).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..models.dae import UserRows
from .games import SubsetGame, play_subsets
from .permutation import seeded_generator

log = logging.getLogger("recval_ray.shapley")

# random streams derived from the seed
_INIT, _ORDER, _TRAIN, _VALID = 0, 1, 2, 3


@dataclass
class FastSHAPConfig:
    """``hidden``: explainer widths (``I -> hidden... -> I``); ``samples``: coalitions per user
    per step (even when ``paired``); ``batch_size``: users per step; ``valid_samples``:
    fixed validation coalitions per user (0: select on the training loss); ``patience``:
    epochs without a better validation loss before stopping. A step densifies
    ``batch_size x samples`` input rows of ``I`` floats: lower ``batch_size`` for many items."""
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    samples: int = 32
    paired: bool = True
    epochs: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    patience: int = 10
    valid_samples: int = 32


class ExplainerNet(nn.Module):
    """``I -> hidden[0] -> ... -> I`` with ReLU between layers: the raw values ``phi_theta``."""

    def __init__(self, n_items: int, hidden: list[int]):
        super().__init__()
        dims = [n_items] + [int(h) for h in hidden] + [n_items]
        layers: list[nn.Module] = []
        for j, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if j < len(dims) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def efficient_normalise(raw: torch.Tensor, observed: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """Additive efficient normalisation: ``raw + x (g - x.raw) / n`` on the players (``x = 1``),
    0 elsewhere, so that each row's values sum to ``gain``."""
    n = observed.sum(1, keepdim=True).clamp_min(1.0)
    gap = gain.to(raw.dtype)[:, None] - (raw * observed).sum(1, keepdim=True)
    return (raw + gap / n) * observed


def harmonic_table(n_max: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``H[j] = sum_{t=1}^{j} 1/t`` for ``j = 0..n_max`` (float64, ``H[0] = 0``)."""
    t = torch.arange(1, max(n_max, 0) + 1, dtype=torch.float64, device=device)
    return torch.cat([torch.zeros(1, dtype=torch.float64, device=device), (1.0 / t).cumsum(0)])


def sample_sizes(n: torch.Tensor, m: int, generator: torch.Generator) -> torch.Tensor:
    """Coalition sizes ``[B, m]`` with ``p(k) ∝ 1/(k(n_b - k))`` on ``1..n_b-1`` (needs ``n_b >= 2``)."""
    n = n.cpu().to(torch.int64)
    if len(n) and int(n.min()) < 2:
        raise ValueError("coalition sizes need at least two players")
    H = harmonic_table(int(n.max()) if len(n) else 1)
    target = torch.rand(len(n), m, generator=generator, dtype=torch.float64) * H[n - 1][:, None]
    j = torch.searchsorted(H, target, right=True).clamp(1, None)
    j = torch.minimum(j, (n - 1)[:, None])              # guards the float edge t == H[n-1]
    flip = torch.rand(len(n), m, generator=generator) < 0.5
    return torch.where(flip, n[:, None] - j, j)


def sample_coalitions(n: torch.Tensor, m: int, paired: bool, generator: torch.Generator,
                      width: Optional[int] = None) -> torch.Tensor:
    """Coalition masks ``[B, m, width]`` over each row's first ``n_b`` player slots (slots
    ``>= n_b`` are padding, always False). Sizes follow :func:`sample_sizes`, members are a
    uniform subset of that size; ``paired``: sample ``2t + 1`` is the complement of ``2t``."""
    n = n.cpu().to(torch.int64)
    width = int(n.max()) if width is None else int(width)
    if paired and m % 2:
        raise ValueError(f"paired sampling needs an even number of samples, got {m}")
    base = m // 2 if paired else m
    k = sample_sizes(n, base, generator)                                        # [B, base]
    slot = torch.arange(width)
    valid = slot[None, :] < n[:, None]                                          # [B, width]
    keys = torch.rand(len(n), base, width, generator=generator)
    keys = torch.where(valid[:, None, :], keys, torch.full_like(keys, 2.0))     # padding sorts last
    # the order of the keys is a uniform permutation sigma of the slots that maps the valid
    # slots 0..n-1 onto themselves: {j : sigma(j) < k} is a uniform k-subset of them
    masks = keys.argsort(-1) < k[..., None]
    if paired:
        masks = torch.stack([masks, ~masks & valid[:, None, :]], dim=2).reshape(len(n), m, width)
    return masks


@dataclass
class TrainedExplainer:
    """The trained explainer with what :func:`explain` needs: the players, the game's gains
    ``g_u = v_u(P_u) - v_u({})`` and baselines ``v_u({})``, and the training record."""
    net: ExplainerNet
    players: UserRows
    gain: torch.Tensor          # [n_users] float64
    empty_value: torch.Tensor   # [n_users] float64
    history: list = field(default_factory=list)
    best_epoch: int = -1
    best_valid: float = float("nan")
    seconds: float = 0.0

    @property
    def device(self) -> torch.device:
        return self.players.device

    def to(self, device: torch.device | str) -> "TrainedExplainer":
        """A copy for inference on ``device`` (the network copied, never shared): what the
        Ray layer ships to its actors."""
        dev = torch.device(device)
        net = copy.deepcopy(self.net).to(dev)
        net.eval()
        return TrainedExplainer(net, self.players.to(dev), self.gain.to(dev), self.empty_value.to(dev),
                                history=list(self.history), best_epoch=self.best_epoch,
                                best_valid=self.best_valid, seconds=self.seconds)


class _UserBatch:
    """A batch of users: their full rows ``x_u`` and, for every player, its batch row, slot
    (position among the user's players) and item."""

    def __init__(self, players: UserRows, users: torch.Tensor):
        self.users = users
        self.n = players.counts(users)
        r, k = players.coords(users)
        self._r, self._slot, self._item = r, k - players.indptr[users][r], players.item[k]
        self.observed = torch.zeros(len(users), players.n_items, device=users.device)
        self.observed[r, self._item] = 1.0

    def subset_rows(self, masks: torch.Tensor) -> torch.Tensor:
        """Coalition masks ``[B, m, width]`` -> input rows ``x_S [B, m, I]``."""
        B, m, _ = masks.shape
        x = torch.zeros(B, m, self.observed.shape[1], device=self.observed.device)
        on = masks.to(x.device)[self._r, :, self._slot]                           # [entries, m]
        x[self._r[:, None], torch.arange(m, device=x.device)[None, :], self._item[:, None]] = on.to(x.dtype)
        return x


def _batch_loss(net: ExplainerNet, batch: _UserBatch, x_sub: torch.Tensor, v_sub: torch.Tensor,
                gain: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """Mean over users and coalitions of ``(v(S) - v({}) - sum_{i in S} phi_i)^2``."""
    phi = efficient_normalise(net(batch.observed), batch.observed, gain)         # [B, I]
    pred = torch.bmm(x_sub, phi[:, :, None]).squeeze(-1).double()               # [B, m]
    return ((v_sub - empty[:, None] - pred) ** 2).mean()


def _coalition_values(game: SubsetGame, batch: _UserBatch, x_sub: torch.Tensor) -> torch.Tensor:
    B, m, I = x_sub.shape
    obs = batch.observed[:, None, :].expand(B, m, I).reshape(B * m, I)
    users = batch.users.repeat_interleave(m)
    return play_subsets(game, obs, x_sub.reshape(B * m, I), users).reshape(B, m).to(torch.float64)


@torch.no_grad()
def game_endpoints(game: SubsetGame, players: UserRows, batch_users: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v_u({}), v_u(P_u))`` for every user ``[n_users]`` (0 for users without players)."""
    dev = players.device
    empty = torch.zeros(players.n_users, dtype=torch.float64, device=dev)
    full = torch.zeros_like(empty)
    users = torch.nonzero(players.counts(torch.arange(players.n_users, device=dev)) > 0).reshape(-1)
    for s in range(0, len(users), batch_users):
        u = users[s:s + batch_users]
        x = players.dense(u)
        empty[u] = play_subsets(game, x, torch.zeros_like(x), u).to(torch.float64)
        full[u] = play_subsets(game, x, x, u).to(torch.float64)
    return empty, full


def train_explainer(game: SubsetGame, players: UserRows, config: FastSHAPConfig = FastSHAPConfig(),
                    seed: int = 0, device: torch.device | str = "cpu",
                    progress: Optional[Callable[[str], None]] = None) -> TrainedExplainer:
    """Train a FastSHAP explainer of ``game`` for every user of ``players`` (module doc)."""
    t0 = time.perf_counter()
    dev = torch.device(device)
    players = players.to(dev)
    cfg = config
    if cfg.samples < 1 or (cfg.paired and cfg.samples % 2):
        raise ValueError(f"samples must be positive (and even when paired), got {cfg.samples}")
    if cfg.valid_samples < 0 or (cfg.paired and cfg.valid_samples % 2):
        raise ValueError(f"valid_samples must be >= 0 (and even when paired), got {cfg.valid_samples}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeded_generator(seed, _INIT).initial_seed())
        net = ExplainerNet(players.n_items, cfg.hidden)
    net = net.to(dev)
    empty, full = game_endpoints(game, players)
    gain = full - empty
    counts = players.counts(torch.arange(players.n_users, device=dev))
    learners = torch.nonzero(counts >= 2).reshape(-1)                 # users with a coalition to learn
    explainer = TrainedExplainer(net, players, gain, empty)
    if len(learners) == 0:
        explainer.seconds = time.perf_counter() - t0
        return explainer
    bs = max(1, int(cfg.batch_size))

    # fixed validation coalitions: stream _VALID, one generator per batch; values computed once
    # (users, masks, values) per batch; the dense inputs are rebuilt at each evaluation
    valid = []
    if cfg.valid_samples > 0:
        for b, s in enumerate(range(0, len(learners), bs)):
            batch = _UserBatch(players, learners[s:s + bs])
            masks = sample_coalitions(batch.n, cfg.valid_samples, cfg.paired, seeded_generator(seed, _VALID, b))
            valid.append((batch.users, masks, _coalition_values(game, batch, batch.subset_rows(masks))))

    def valid_loss() -> float:
        net.eval()
        tot = 0.0
        with torch.no_grad():
            for u, masks, v_sub in valid:
                batch = _UserBatch(players, u)
                loss = _batch_loss(net, batch, batch.subset_rows(masks), v_sub, gain[u], empty[u])
                tot += float(loss) * len(u)
        net.train()
        return tot / len(learners)

    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best_state, best, since = copy.deepcopy(net.state_dict()), math.inf, 0
    net.train()
    for epoch in range(int(cfg.epochs)):
        order_gen = seeded_generator(seed, _ORDER, epoch)
        draw_gen = seeded_generator(seed, _TRAIN, epoch)
        order = learners[torch.randperm(len(learners), generator=order_gen).to(dev)]
        total = 0.0
        for s in range(0, len(order), bs):
            batch = _UserBatch(players, order[s:s + bs])
            masks = sample_coalitions(batch.n, cfg.samples, cfg.paired, draw_gen)
            x_sub = batch.subset_rows(masks)
            v_sub = _coalition_values(game, batch, x_sub)
            loss = _batch_loss(net, batch, x_sub, v_sub, gain[batch.users], empty[batch.users])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch.users)
        record = {"epoch": epoch, "train_loss": total / len(learners)}
        if valid:
            record["valid_loss"] = valid_loss()
        explainer.history.append(record)
        score = record.get("valid_loss", record["train_loss"])
        if score < best:
            best, since = score, 0
            best_state = copy.deepcopy(net.state_dict())
            explainer.best_epoch, explainer.best_valid = epoch, score
        else:
            since += 1
        if progress is not None:
            progress(f"explainer epoch {epoch}: " + ", ".join(f"{k} {v:.3g}" for k, v in record.items() if k != "epoch"))
        if since >= cfg.patience:
            break
    net.load_state_dict(best_state)
    net.eval()
    explainer.seconds = time.perf_counter() - t0
    return explainer


@torch.no_grad()
def explain(explainer: TrainedExplainer, users: Optional[torch.Tensor] = None,
            batch_users: int = 1024) -> torch.Tensor:
    """Shapley values (float64) of the players of ``users`` (default: all users), in the
    order of ``users`` and, within a user, of its items ascending: with the default, value
    ``e`` is the value of player entry ``e`` of ``explainer.players``."""
    players, dev = explainer.players, explainer.device
    users = torch.arange(players.n_users, device=dev) if users is None else torch.as_tensor(users, device=dev)
    explainer.net.eval()
    out = []
    for s in range(0, len(users), batch_users):
        u = users[s:s + batch_users]
        r, k = players.coords(u)
        x = players.dense(u)
        phi = efficient_normalise(explainer.net(x).double(), x.double(), explainer.gain[u])
        out.append(phi[r, players.item[k]])
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=dev)
