"""DVRL valuer: discrete data values learned by policy gradient (Yoon, Arik & Pfister 2020).

A selector MLP maps each training interaction's features (base-model user and item embeddings,
training loss, item log-popularity, rating, within-user recency; :func:`...dvrl.interaction_features`)
to a keep probability ``p_i``. Each of ``iterations`` outer steps draws
``selections_per_iteration`` selections ``s_k ~ Bernoulli(p)`` (one generator seeded by
``seed``), trains the recommender on each for ``inner_epochs`` epochs, and scores it on the
validation split (``metric``; never the test split). Reward ``r_k = m(s_k) - m(full)``, ``m(full)``
the same inner training on every row (computed once); the selector takes one Adam step on the
REINFORCE loss with a moving-average baseline and DVRL's exploration penalty (:mod:`...dvrl`).
``value_i`` = ``p_i`` after the last step.

Inner training (``init``): ``base`` (default) starts every model from the base model's weights
and fine-tunes it, so ``m(s) - m(full)`` is the validation effect of continuing training with
or without the rows, at the base model's accuracy, for a few epochs; ``scratch`` starts from the
seeded initialisation (needs enough ``inner_epochs`` / ``inner_lr`` to learn something). Every
selection uses the same initialisation and the same batch stream (seed ``seed``): rewards of
two selections differ only by the selections (common random numbers). MF models are trained
K at a time as one stacked computation (:func:`...dvrl.train_selected_mf`, plain BPR batches of
the base's sampler); other models are retrained one selection at a time with the generic
trainer (no early stopping).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import torch

from ...registry import register_valuer
from .selector import (MovingBaseline, Selector, interaction_features, reinforce_loss,
                    train_selected_mf)
from ...evaluation import evaluation_users, noise_detection
from ...metrics import parse_metric, ranking_metrics
from ...models.mf import MF, BPRTask
from ...train import build_task, fit, loss_generator, validation_score
from ..base import MethodInfo, Valuation, ValuationContext, Valuer, require_validation

log = logging.getLogger("recval_ray")


@dataclass(eq=False)
class DVRLInfo(MethodInfo):
    """DVRL's run: the reward metric and its full-data value, the policy-gradient settings, the
    selector's features (and those left out, why), the reward curve and final baseline."""
    metric: Optional[str] = None
    full_data_metric: Optional[float] = None
    iterations: Optional[int] = None
    selections_per_iteration: Optional[int] = None
    inner_epochs: Optional[int] = None
    inner_lr: Optional[float] = None
    init: Optional[str] = None
    engine: Optional[str] = None
    features: Optional[list] = None
    embedding_dims: Optional[int] = None
    features_omitted: Optional[dict] = None
    loss_rows_filled: Optional[int] = None
    reward_curve: Optional[list] = None
    final_baseline: Optional[float] = None


@dataclass
class DVRLConfig:
    """``valuation.method: dvrl``. ``metric``: validation metric of the reward (default
    ``train.select_metric``); ``inner_lr`` (default ``train.lr``); ``threshold_lo/hi`` and
    ``penalty_weight``: DVRL's exploration penalty (reference code: 0.1 / 0.9 / 1e3);
    ``baseline_window``: T of the moving-average baseline; ``init_keep``: the selector's initial
    mean keep probability (its output bias); ``embeddings``: feed the base model's user and item
    embeddings to the selector (else only the scalar features)."""
    method: str = "dvrl"
    iterations: int = 50
    selections_per_iteration: int = 4
    inner_epochs: int = 2
    inner_lr: Optional[float] = None
    init: Literal["base", "scratch"] = "base"
    hidden: list[int] = field(default_factory=lambda: [64, 32])
    lr: float = 0.01
    baseline_window: int = 10
    threshold_lo: float = 0.1
    threshold_hi: float = 0.9
    penalty_weight: float = 1000.0
    init_keep: float = 0.5
    embeddings: bool = True
    metric: Optional[str] = None
    seed: int = 0

    def validate(self) -> None:
        if self.iterations < 1 or self.selections_per_iteration < 1 or self.inner_epochs < 1:
            raise ValueError("valuation.iterations, selections_per_iteration and inner_epochs must be >= 1")
        if not 0.0 <= self.threshold_lo < self.threshold_hi <= 1.0:
            raise ValueError("valuation.threshold_lo < threshold_hi, both in [0, 1]")
        if not 0.0 < self.init_keep < 1.0:
            raise ValueError("valuation.init_keep must be in (0, 1)")
        if self.baseline_window < 1 or self.lr <= 0 or self.penalty_weight < 0:
            raise ValueError("valuation.baseline_window >= 1, lr > 0, penalty_weight >= 0")
        if any(int(h) < 1 for h in self.hidden):
            raise ValueError("valuation.hidden: positive layer widths")
        if self.metric is not None:
            try:
                parse_metric(self.metric)
            except ValueError as e:
                raise ValueError(f"valuation.metric: {e}") from None


def _embeddings(model) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """The base model's user and item tables (LightGCN: propagated), or ``(None, None)``."""
    with torch.no_grad():
        if hasattr(model, "final_embeddings"):
            eu, ei = model.final_embeddings()
        elif hasattr(model, "user_emb") and hasattr(model, "item_emb"):
            eu, ei = model.user_emb.weight, model.item_emb.weight
        else:
            return None, None
        return eu.detach().cpu().numpy(), ei.detach().cpu().numpy()


def _training_loss(ctx: ValuationContext) -> tuple[np.ndarray, int]:
    """The base's per-row training loss; rows never measured get the final model's loss
    (``task.all_losses``) or the mean. Returns ``(loss, rows filled)``."""
    n = len(ctx.split.train)
    loss = ctx.base.interaction_loss
    loss = np.full(n, np.nan) if loss is None else np.array(loss, dtype=np.float64)
    missing = ~np.isfinite(loss)
    task = getattr(ctx.base, "task", None)
    if missing.any() and hasattr(task, "all_losses"):
        final = task.all_losses(loss_generator(int(ctx.train_cfg.seed)),
                                int(getattr(ctx.train_cfg, "loss_negatives", 1))).cpu().numpy()
        loss[missing] = final[missing]
    still = ~np.isfinite(loss)
    loss[still] = np.nanmean(loss) if (~still).any() else 0.0
    return loss, int(missing.sum())


class DVRLValuer(Valuer):
    name = "dvrl"

    def value(self, ctx: ValuationContext) -> Valuation:
        o: DVRLConfig = self.options
        t0 = time.perf_counter()
        train, valid = ctx.split.train, ctx.split.valid
        if len(valid) == 0:
            raise ValueError("valuation.method dvrl needs a validation split (its reward)")
        metric = o.metric or ctx.train_cfg.select_metric
        parse_metric(metric)        # a ranking metric (rmse / mae raise here)
        inner_cfg = dataclasses.replace(ctx.train_cfg, epochs=int(o.inner_epochs),
                                        lr=float(o.inner_lr if o.inner_lr is not None else ctx.train_cfg.lr),
                                        seed=int(o.seed), patience=10 ** 9)
        base_model = ctx.base.model
        loss, filled = _training_loss(ctx)
        eu, ei = _embeddings(base_model) if o.embeddings else (None, None)
        x_np, names, omitted = interaction_features(train, loss, eu, ei)
        x = torch.as_tensor(x_np)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(o.seed))
            selector = Selector(x.shape[1], o.hidden)
        with torch.no_grad():
            selector.net[-1].bias.fill_(float(np.log(o.init_keep / (1 - o.init_keep))))
        opt = torch.optim.Adam(selector.parameters(), lr=float(o.lr))
        gen = torch.Generator().manual_seed(int(o.seed))
        baseline = MovingBaseline(o.baseline_window)

        rewarder = self._stacked_mf(ctx, inner_cfg, metric) if isinstance(base_model, MF) \
            else self._sequential(ctx, inner_cfg, metric)
        m_full = float(rewarder(torch.ones(1, len(train), dtype=torch.bool))[0])
        log.info("dvrl: %d features (%s), full-data %s after %d inner epochs (%s init): %.5f",
                 x.shape[1], ", ".join(n for n in names if not n.startswith(("user_emb", "item_emb")))
                 + (f" + {2 * eu.shape[1]} embedding dims" if eu is not None else ""),
                 metric, o.inner_epochs, o.init, m_full)

        curve = []
        K = int(o.selections_per_iteration)
        noisy = (torch.as_tensor(np.asarray(train.is_noise, dtype=bool))
                 if train.is_noise is not None and np.asarray(train.is_noise).any() else None)
        for it in range(int(o.iterations)):
            ti = time.perf_counter()
            logits = selector(x)
            p = torch.sigmoid(logits.detach())
            s = torch.bernoulli(p.expand(K, -1), generator=gen)
            rewards = np.asarray(rewarder(s.bool()), dtype=np.float64) - m_full
            adv = baseline.advantage(rewards)
            loss_t = reinforce_loss(logits, s, torch.as_tensor(adv), o.threshold_lo, o.threshold_hi,
                                    o.penalty_weight)
            opt.zero_grad(set_to_none=True)
            loss_t.backward()
            opt.step()
            b = baseline.update(rewards)
            rec = {"iteration": it, "reward_mean": float(rewards.mean()), "reward_max": float(rewards.max()),
                   "reward_min": float(rewards.min()), "baseline": b, "mean_keep": float(p.mean()),
                   "kept_fraction": float(s.mean()), "seconds": time.perf_counter() - ti}
            if noisy is not None:      # diagnostics only: the flags never reach the selector
                rec["mean_keep_noise"] = float(p[noisy].mean())
                rec["mean_keep_clean"] = float(p[~noisy].mean())
                rec["noise_auc"] = float(noise_detection(p.double().numpy(), noisy.numpy())["auc"])
            curve.append(rec)
            log.info("dvrl iteration %d/%d: reward mean %+.5f (min %+.5f, max %+.5f), baseline %+.5f, "
                     "mean keep %.3f%s, %.1fs", it + 1, o.iterations, rec["reward_mean"], rec["reward_min"],
                     rec["reward_max"], b, rec["mean_keep"],
                     (f" (noise {rec['mean_keep_noise']:.3f}, clean {rec['mean_keep_clean']:.3f}, "
                      f"noise AUC {rec['noise_auc']:.3f})" if noisy is not None else ""), rec["seconds"])
            if ctx.progress is not None:
                ctx.progress(f"dvrl iteration {it + 1}/{o.iterations}")

        with torch.no_grad():
            values = torch.sigmoid(selector(x)).double().numpy()
        info = DVRLInfo(metric=metric, full_data_metric=m_full, iterations=int(o.iterations),
                        selections_per_iteration=K, inner_epochs=int(o.inner_epochs),
                        inner_lr=float(inner_cfg.lr), init=o.init,
                        engine="stacked-mf" if isinstance(base_model, MF) else "sequential",
                        features=[n for n in names if not n.startswith(("user_emb", "item_emb"))],
                        embedding_dims=0 if eu is None else int(eu.shape[1]),
                        features_omitted=omitted, loss_rows_filled=filled,
                        reward_curve=curve, final_baseline=baseline.value,
                        seconds=time.perf_counter() - t0)
        return Valuation(method=self.name, values=values, columns={"keep_probability": values}, info=info)

    # -- rewarders: selections [K, N] bool -> validation metrics [K] ---------------------
    def _stacked_mf(self, ctx: ValuationContext, inner_cfg, metric: str):
        """K MF models per call, trained as one stack (plain BPR batches of the base's sampler)."""
        o: DVRLConfig = self.options
        base = ctx.base.model
        train, valid = ctx.split.train, ctx.split.valid
        if o.init == "base":
            u0, i0 = base.user_emb.weight.detach().clone(), base.item_emb.weight.detach().clone()
        else:
            fresh = build_task(ctx.model_cfg, train, inner_cfg).model
            u0, i0 = fresh.user_emb.weight.detach().clone(), fresh.item_emb.weight.detach().clone()
        task = BPRTask(base, train, int(inner_cfg.batch_size), float(ctx.model_cfg.reg),
                       int(inner_cfg.num_negatives), getattr(ctx.model_cfg, "sampler", "interactions"))
        dev = u0.device
        name, k = parse_metric(metric)
        kw = {"users": evaluation_users(ctx.eval_cfg, valid)[0]}   # evaluate.sample_users: the seeded sample
        if ctx.eval_cfg is not None:
            kw.update(ndcg_variant=ctx.eval_cfg.ndcg_variant, recall_variant=ctx.eval_cfg.recall_variant,
                      batch_users=ctx.eval_cfg.batch_users)

        def rewarder(masks: torch.Tensor) -> np.ndarray:
            U, I = train_selected_mf(task, masks.to(dev), u0, i0, inner_cfg, int(o.inner_epochs),
                                     int(o.seed), float(ctx.model_cfg.reg))
            out = []
            with torch.no_grad():
                for j in range(U.shape[1]):
                    uj, ij = U[:, j].contiguous(), I[:, j].contiguous()
                    res = ranking_metrics(lambda users: uj.index_select(0, users) @ ij.T, valid, [train],
                                          metrics=[metric], ks=[k] if k else [], device=dev, **kw)
                    out.append(res[metric])
            return np.asarray(out, dtype=np.float64)

        return rewarder

    def _sequential(self, ctx: ValuationContext, inner_cfg, metric: str):
        """Any model: one retraining per selection with the generic trainer (no early stopping)."""
        o: DVRLConfig = self.options
        train = ctx.split.train
        # parameters only: buffers / attributes built from the training rows (e.g. a graph)
        # stay those of the selection
        state = ({n: p.detach().clone() for n, p in ctx.base.model.named_parameters()}
                 if o.init == "base" else None)
        users = evaluation_users(ctx.eval_cfg, ctx.split.valid)[0]   # drawn once

        def rewarder(masks: torch.Tensor) -> np.ndarray:
            out = []
            for row in masks.cpu().numpy():
                task = build_task(ctx.model_cfg, train.take(row), inner_cfg)
                if state is not None:
                    task.model.load_state_dict(state, strict=False)
                res = fit(task, inner_cfg, track_losses=False)
                out.append(validation_score(res.model, ctx.split.valid, [train], metric, ctx.eval_cfg, users=users))
            return np.asarray(out, dtype=np.float64)

        return rewarder


def check_job(job) -> None:
    """DVRL's reward is the validation metric: the job must plan a validation split."""
    require_validation(job, "valuation.method dvrl (its reward is a validation metric)")


@register_valuer("dvrl", DVRLConfig, check=check_job)
def build_dvrl(opts: DVRLConfig) -> DVRLValuer:
    return DVRLValuer(opts)
