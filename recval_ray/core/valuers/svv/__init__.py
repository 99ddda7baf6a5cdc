"""SVV: Shapley values of interactions under a frozen DAE, amortised by FastSHAP
("Shapley Value-driven Data Pruning for Recommender Systems", KDD 2025).

Each user ``u`` is a game whose players are the user's training interactions; the value of
a coalition ``S`` is what the trained base DAE makes of the input holding only ``S``
(:mod:`...shapley.games`: ``variant: recon-error``, the normalised decrease of the
confidence-weighted squared reconstruction error of the user's observed items, or
``mean-score``, the mean reconstructed score on them). A FastSHAP explainer
(:mod:`...shapley.fastshap`) learns every interaction's Shapley value from the users' games and
outputs them in one forward pass per batch of users; ``value`` is that Shapley value (higher =
more useful), and the values of a user sum to ``v_u(all) - v_u(empty)`` (column ``user_gain``).

``reference: true`` also computes reference Shapley values for ``reference_users`` users
drawn with ``seed`` (exact enumeration up to ``reference_exact_max`` interactions,
permutation sampling to a standard error below ``reference_tolerance`` x the mean absolute
value otherwise) and reports the explainer's agreement with them in ``info["reference"]``.

On Ray (the context's ``distributed`` port, passed by the pipeline when the job runs with Ray), ``inference: auto``
runs the explainer's inference over all users as Ray Data ``map_batches`` on a pool of
``inference_actors`` actors (GPU actors when the cluster has GPUs), and the reference values as
Ray tasks of ``reference_group`` users each (:mod:`recval_ray.ray_layer.explain`); the values
are those of the in-process path (up to float32 rounding by batch shape for the explainer;
the reference values are computed per user from their own seeded streams).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import torch

from ...registry import register_valuer
from ...models.dae import AutoEncoder, UserRows
from ...shapley.exact import MAX_EXACT_PLAYERS
from ...shapley.fastshap import FastSHAPConfig, explain, train_explainer
from ...shapley.games import DAEGame, interaction_players
from ...shapley.reference import agreement, reference_shapley, sample_users
from ..base import MethodInfo, Resources, Valuation, ValuationContext, Valuer, require_validation


@dataclass(eq=False)
class SVVInfo(MethodInfo):
    """SVV's run: value-function variant, seed, device, the explainer's training and inference
    (``explainer``) and, when computed, its agreement with reference Shapley values."""
    variant: Optional[str] = None
    seed: Optional[int] = None
    device: Optional[str] = None
    explainer: Optional[dict] = None
    reference: Optional[dict] = None


@dataclass
class SVVConfig(FastSHAPConfig):
    """Options of ``valuation.method: svv`` (the explainer's are :class:`FastSHAPConfig`'s).

    ``variant``: the value function (``recon-error``: the paper; ``mean-score``: the authors'
    code; ``valid-margin``: the lift of the user's validation items over never-seen items, a
    held-out utility, see :mod:`...shapley.games`); explainer: ``hidden`` widths, ``samples`` coalitions per user per step (even when
    ``paired``), ``paired`` complementary sampling, ``epochs``, ``lr`` (Adam), ``weight_decay``,
    ``batch_size`` users per step, ``patience`` epochs, ``valid_samples`` fixed validation
    coalitions per user; ``seed`` (null: ``train.seed``); ``device`` (null: the base model's);
    ``value_batch``: coalitions per DAE forward. Reference check: ``reference``,
    ``reference_users``, ``reference_exact_max``, ``reference_tolerance`` (relative),
    ``reference_max_permutations``.

    Ray: ``inference`` (``auto``: Ray Data when the job runs on Ray, else in-process;
    ``local``; ``ray-data``), ``inference_batch_users`` (user ids per batch); ``reference_on``
    (``auto``: Ray tasks when the job runs on Ray; ``local``; ``ray``), ``reference_group``
    (users per task). Placement, ``valuation.resources``: ``actors`` (the inference pool's
    size, default 2), ``cpus`` and ``gpus`` per inference actor and reference task (``gpus``
    null: 1 GPU per inference actor when the cluster has one, else 0; reference tasks use no GPU
    unless ``gpus`` is set).
    """
    method: str = "svv"
    variant: Literal["recon-error", "mean-score", "valid-margin"] = "recon-error"
    seed: Optional[int] = None
    device: Optional[str] = None
    value_batch: int = 8192
    reference: bool = False
    reference_users: int = 50
    reference_exact_max: int = MAX_EXACT_PLAYERS
    reference_tolerance: float = 0.05
    reference_max_permutations: int = 1000
    inference: Literal["auto", "local", "ray-data"] = "auto"
    inference_batch_users: int = 256
    reference_on: Literal["auto", "local", "ray"] = "auto"
    reference_group: int = 1
    resources: Resources = field(default_factory=lambda: Resources(actors=2, gpus=None))

    def validate(self) -> None:
        for key in ("inference_batch_users", "reference_group") + \
                (("reference_users",) if self.reference else ()):
            if getattr(self, key) < 1:
                raise ValueError(f"valuation.{key}: {getattr(self, key)} must be >= 1")
        self.resources.validate()


def _resolve(choice: str, ray_name: str, distributed, key: str) -> str:
    """``auto`` -> the distributed path when the job runs on Ray (the context's
    ``distributed`` port); an explicit Ray path needs that port."""
    if choice == "auto":
        return ray_name if distributed is not None else "local"
    if choice == ray_name and distributed is None:
        raise ValueError(f"valuation.{key}: {ray_name} needs Ray (run the job with Ray, or set {key}: local)")
    return choice


class SVVValuer(Valuer):
    name = "svv"

    def value(self, ctx: ValuationContext) -> Valuation:
        o = self.options
        model = getattr(ctx.base, "model", None)
        kind = getattr(ctx.model_cfg, "kind", None)
        if kind != "dae" or not isinstance(model, AutoEncoder) or model.output != "sigmoid":
            raise ValueError(f"valuation.method svv needs the SVV DAE as base model (model.kind: dae), "
                             f"got model.kind {kind!r}")
        seed = int(ctx.seed if o.seed is None else o.seed)
        dev = torch.device(o.device) if o.device else next(model.parameters()).device
        if next(model.parameters()).device != dev:
            model = copy.deepcopy(model).to(dev)
        train = ctx.split.train
        targets = None
        if o.variant == "valid-margin":
            valid = ctx.split.valid
            if valid is None or len(valid) == 0:
                raise ValueError("valuation.variant valid-margin needs a validation split with interactions")
            targets = UserRows(valid.user, valid.item, valid.n_users, valid.n_items, dev, unique=True)
        game = DAEGame(model, ctx.model_cfg.rho, o.variant, batch_size=o.value_batch, targets=targets)
        players, player_of_row = interaction_players(train, dev)
        config = FastSHAPConfig(**{f.name: copy.deepcopy(getattr(o, f.name)) for f in dataclasses.fields(FastSHAPConfig)})
        saved = (ctx.prior or {}).get("explainer")
        if saved is not None:
            # recval update: the base run's explainer applied to the updated users' coalitions
            # under the fine-tuned DAE, not trained again (the amortisation pays here)
            explainer = reuse_explainer(saved, game, players, config, seed, dev)
        else:
            explainer = train_explainer(game, players, config, seed=seed, device=dev, progress=ctx.progress)
        dist = ctx.distributed
        inference = _resolve(o.inference, "ray-data", dist, "inference")
        t = time.perf_counter()
        if inference == "ray-data":
            per_player = dist.explain_batches(explainer, actors=max(1, o.resources.actors),
                                              batch_users=o.inference_batch_users, num_cpus=o.resources.cpus,
                                              num_gpus=o.resources.gpus).numpy()
        else:
            per_player = explain(explainer).cpu().numpy()
        explain_s = time.perf_counter() - t
        values = per_player[player_of_row]
        if targets is not None:
            # users without held-out items play the zero game: their Shapley values are exactly
            # 0 (the explainer, trained on all users, only gets their sum right)
            has_targets = np.bincount(ctx.split.valid.user, minlength=train.n_users) > 0
            values = np.where(has_targets[train.user], values, 0.0)
        gain = explainer.gain.cpu().numpy()[train.user]
        info = SVVInfo(variant=o.variant, seed=seed, device=str(dev),
                       explainer={"reused": saved is not None,
                                  "epochs_run": len(explainer.history), "best_epoch": explainer.best_epoch,
                                  "best_valid_loss": explainer.best_valid, "train_s": explainer.seconds,
                                  "explain_s": explain_s, "inference": inference, "history": explainer.history})
        if inference == "ray-data":
            info["explainer"]["inference_actors"] = max(1, o.resources.actors)
        tables = {}
        if o.reference:
            where = _resolve(o.reference_on, "ray", dist, "reference_on")
            info["reference"], refs, est = self._reference(game, players, explainer, seed, where, dist)
            tables["shapley_reference"] = _reference_table(ctx, players, player_of_row, refs, est)
        state = {"explainer": {k: v.detach().cpu().clone() for k, v in explainer.net.state_dict().items()}}
        return Valuation(method=self.name, values=values, columns={"user_gain": gain}, tables=tables, info=info,
                         state=state)

    def _reference(self, game, players, explainer, seed: int, where: str = "local", dist=None):
        """Agreement of the explainer with reference values on ``reference_users`` users
        (``where``: ``local`` in this process, ``ray`` as Ray tasks): ``(agreement, the
        references, the explainer's values at the same players)``."""
        o = self.options
        t = time.perf_counter()
        users = sample_users(players, o.reference_users, seed)
        kw = dict(exact_max=o.reference_exact_max, rel_tolerance=o.reference_tolerance,
                  max_permutations=o.reference_max_permutations, seed=seed, batch_size=o.value_batch)
        if where == "ray":
            refs = dist.reference_shapley(game, players, users, group=o.reference_group,
                                          num_cpus=o.resources.cpus, num_gpus=o.resources.gpus or 0.0, **kw)
        else:
            refs = reference_shapley(game, players, users, **kw)
        ref_s = time.perf_counter() - t
        est = explain(explainer, torch.as_tensor(users, device=players.device)).cpu().numpy()
        ref = np.concatenate([r.values for r in refs]) if refs else np.zeros(0)
        user = np.concatenate([np.full(len(r.values), r.user) for r in refs]) if refs else np.zeros(0, np.int64)
        out = agreement(est, ref, user)
        perm = [r for r in refs if r.method == "permutation"]
        out.update(exact_users=len(refs) - len(perm), permutation_users=len(perm),
                   converged_users=sum(r.converged for r in perm),
                   permutations=int(sum(r.n_permutations for r in perm)), seconds=ref_s, on=where)
        return out, refs, est


def reuse_explainer(saved: dict, game, players, config, seed: int, dev):
    """A trained explainer from an earlier run's weights (``saved``), grown to this catalogue
    (every weight copied into its leading block; new items' output rows and input columns keep
    the seeded initialisation), with this game's endpoints (``v_u({})`` and ``v_u(P_u)`` under
    the current DAE): the efficiency normalisation keeps each user's values summing to its gain."""
    from ...shapley.fastshap import ExplainerNet, TrainedExplainer, game_endpoints, seeded_generator, _INIT
    from ...update import grow_state
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeded_generator(seed, _INIT).initial_seed())
        net = ExplainerNet(players.n_items, config.hidden)
    grown, _ = grow_state(saved, net.state_dict())
    net.load_state_dict(grown)
    net = net.to(dev).eval()
    players = players.to(dev)
    empty, full = game_endpoints(game, players)
    out = TrainedExplainer(net, players, full - empty, empty)
    out.seconds = time.perf_counter() - t0
    return out


def _reference_table(ctx: ValuationContext, players: UserRows, player_of_row: np.ndarray, refs, est) -> dict:
    """The reference check per interaction (output table ``shapley_reference``): user_id,
    item_id (the input's ids when the dataset is known), the explainer's value, the reference
    value, its standard error (0 when exact), the reference method, and is_noise."""
    user = np.concatenate([np.full(len(r.values), r.user) for r in refs]) if refs else np.zeros(0, np.int64)
    start = players.indptr.cpu().numpy()
    entry = np.concatenate([np.arange(start[r.user], start[r.user + 1]) for r in refs]) if refs \
        else np.zeros(0, np.int64)
    item = players.item.cpu().numpy()[entry]
    train = ctx.split.train
    noisy = np.zeros(len(players.item), bool)
    if train.is_noise is not None:
        np.logical_or.at(noisy, player_of_row, np.asarray(train.is_noise, bool))
    ds = ctx.dataset
    table = {"user_id": ds.original_users(user) if ds is not None else user,
             "item_id": ds.original_items(item) if ds is not None else item,
             "explainer_value": np.asarray(est, np.float64),
             "reference_value": np.concatenate([r.values for r in refs]) if refs else np.zeros(0),
             "reference_se": np.concatenate([r.std_errors for r in refs]) if refs else np.zeros(0),
             "reference_method": np.concatenate([np.full(len(r.values), r.method) for r in refs]) if refs
             else np.zeros(0, dtype=object),
             "is_noise": noisy[entry]}
    return table


def peak_bytes(job, size) -> tuple:
    """``(bytes, why)``: SVV's peak while training the explainer. A step densifies the coalition
    inputs of ``batch_size x samples`` rows of ``I`` float32 (with the observed rows expanded
    and the bmm: ~3 copies) and the DAE's forward of ``value_batch`` of them (~2 copies); the
    item-sized weights of the explainer (first and last layer) and of the DAE are held ~6 times
    (parameters, gradients, Adam's moments, the best state). Measured on ML-100K-like synthetic
    games (``I`` = 2k/8k/16k items): this over-estimates the peak by 5-20%."""
    o = job.valuation
    I = int(size.n_items)
    rows = int(o.batch_size) * int(o.samples)
    dense = (3 * rows + 2 * min(int(o.value_batch), rows)) * I * 4
    hidden = list(o.hidden) or [0]
    dae = list(getattr(job.model, "hidden", []) or [0])
    weights = 6 * 4 * I * (int(hidden[0]) + int(hidden[-1]) + 2 * int(dae[0]))
    need = dense + weights + 128 * 2 ** 20
    why = (f"{I:,} items x {o.batch_size} users x {o.samples} coalitions per explainer step are densified "
           f"({dense / 2 ** 30:.1f} GiB) and the item-sized weights take {weights / 2 ** 30:.1f} GiB; lower "
           f"valuation.batch_size or valuation.samples (or value_batch), or run on a larger machine")
    return need, why


def check_job(job) -> None:
    """``variant: valid-margin`` scores a user's validation items."""
    if getattr(job.valuation, "variant", None) == "valid-margin":
        require_validation(job, "valuation.variant valid-margin")


@register_valuer("svv", SVVConfig, check=check_job, updates="refresh", peak_bytes=peak_bytes, report_sections=("recval_ray.core.valuers.svv.report:section",))
def build_svv(opts: SVVConfig) -> SVVValuer:
    return SVVValuer(opts)
