"""SVV on Ray: the explainer's inference as Ray Data batch inference, reference Shapley
values as Ray tasks.

* :func:`explain_with_ray_data`: the users' ids, cut into blocks, go through
  ``Dataset.map_batches`` with a fixed pool of ``actors`` actors
  (``ray.data.ActorPoolStrategy``). Each actor is a :class:`ExplainBatches` that receives the
  trained explainer once (one ``ray.put`` of a CPU copy, resolved in its constructor), moves it to
  its device (``cuda`` when the actor holds a GPU) and, per batch of user ids, returns the
  Shapley value of every player of those users with its entry index in the explainer's players
  (CSR order); a GPU per actor when the cluster has GPUs (the pool then holds at most as many
  actors as GPUs). The driver places each value at its entry, so the result does not depend on the
  batching, the number of actors or the order batches finish; it equals the in-process
  :func:`recval_ray.core.shapley.fastshap.explain` up to float32 rounding by batch shape (the
  same function computes each batch).
* :func:`reference_with_ray`: :func:`recval_ray.core.shapley.reference.user_reference` for
  groups of ``group`` users, one Ray task per group, the game and the players put in the object
  store once. Every user's reference is computed alone from its own seeded stream
  (``seeded_generator(seed, user)``) and results are assembled in the order of ``users``, so
  they do not depend on the grouping, the number of workers or the completion order.
"""
from __future__ import annotations

import copy
import logging
from typing import Optional

import numpy as np
import torch

from ..core.shapley.fastshap import TrainedExplainer, explain
from ..core.shapley.reference import UserReference, user_reference

log = logging.getLogger("recval_ray")


def cluster_gpus() -> float:
    """GPUs the connected Ray cluster has (0 when none)."""
    import ray
    return float(ray.cluster_resources().get("GPU", 0.0))


class ExplainBatches:
    """The Ray Data callable class: ``{"user": ids} -> {"entry", "user", "value"}``, one output
    row per player of the batch's users."""

    def __init__(self, explainer, threads: int = 1, device: Optional[str] = None):
        import ray
        if isinstance(explainer, ray.ObjectRef):
            explainer = ray.get(explainer)
        torch.set_num_threads(max(1, int(threads)))
        if device is None:
            device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        # tensors from the object store may be read-only views: to() copies the network
        self.explainer: TrainedExplainer = explainer.to(device)

    def __call__(self, batch: dict) -> dict:
        ex = self.explainer
        users = torch.as_tensor(np.array(batch["user"], dtype=np.int64), device=ex.device)
        r, entry = ex.players.coords(users)
        values = explain(ex, users, batch_users=max(1, len(users)))
        return {"entry": entry.cpu().numpy(), "user": users[r].cpu().numpy(),
                "value": values.cpu().numpy()}


def explain_with_ray_data(explainer: TrainedExplainer, users=None, *, actors: int = 2,
                          batch_users: int = 256, num_cpus: float = 1.0,
                          num_gpus: Optional[float] = None) -> torch.Tensor:
    """Shapley values (float64, CPU) of the players of ``users`` (default: all users), in the
    order of :func:`~recval_ray.core.shapley.fastshap.explain`, computed by a pool of
    ``actors`` Ray Data actors over batches of ``batch_users`` user ids. ``num_gpus`` per
    actor: None = 1 when the cluster has a GPU, else 0 (CPU actors)."""
    import pyarrow as pa
    import ray

    players = explainer.players
    n_entries = int(players.indptr[-1])
    users = np.arange(players.n_users, dtype=np.int64) if users is None else \
        np.asarray(torch.as_tensor(users).cpu(), dtype=np.int64).reshape(-1)
    out = torch.zeros(0, dtype=torch.float64)
    if len(users) == 0:
        return out
    have_gpus = cluster_gpus()
    gpus = (1.0 if have_gpus > 0 else 0.0) if num_gpus is None else float(num_gpus)
    actors = max(1, int(actors))
    if gpus > 0:        # a fixed pool larger than the GPUs allow would wait for ever
        actors = max(1, min(actors, int(have_gpus // gpus)))
    bs = max(1, int(batch_users))
    todo = np.unique(users)
    # blocks of one batch of users (at most ~200 blocks): the actors share the work from the start
    block = max(bs, -(-len(todo) // 200))
    blocks = [pa.table({"user": todo[s:s + block]}) for s in range(0, len(todo), block)]
    ref = ray.put(explainer.to("cpu"))
    ds = ray.data.from_arrow(blocks).map_batches(
        ExplainBatches, fn_constructor_kwargs={"explainer": ref, "threads": max(1, int(num_cpus))},
        batch_size=bs, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=num_cpus, num_gpus=gpus)
    values = np.full(n_entries, np.nan)
    seen = np.zeros(n_entries, dtype=bool)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        entry = np.asarray(batch["entry"], dtype=np.int64)
        values[entry] = batch["value"]
        seen[entry] = True
    _, want = players.to(torch.device("cpu")).coords(torch.as_tensor(users))
    want = want.numpy()
    if not seen[want].all():
        raise RuntimeError(f"Ray Data inference returned no value for {int((~seen[want]).sum())} interactions")
    return torch.as_tensor(values[want])


def _reference_group(shared, users: list[int], options: dict, threads: int, device: str) -> list[UserReference]:
    torch.set_num_threads(max(1, int(threads)))
    game, players = shared
    dev = torch.device(device)
    game = game.to(dev)                               # a copy of the model on this worker
    players = copy.deepcopy(players).to(dev)
    return [user_reference(game, players, int(u), **options) for u in users]


def reference_with_ray(game, players, users, *, group: int = 1, num_cpus: float = 1.0,
                       num_gpus: float = 0.0, **options) -> list[UserReference]:
    """:func:`~recval_ray.core.shapley.reference.user_reference` of every user of ``users``
    (in that order), ``group`` users per Ray task. ``game`` must have a ``to(device)`` (e.g.
    :class:`~recval_ray.core.shapley.games.DAEGame`); ``options`` as ``user_reference``."""
    import ray

    users = [int(u) for u in np.asarray(users).reshape(-1)]
    if not users:
        return []
    task = ray.remote(_reference_group).options(num_cpus=num_cpus, num_gpus=num_gpus)
    shared = ray.put((game.to("cpu"), players.to(torch.device("cpu"))))
    device = "cuda" if num_gpus > 0 else "cpu"
    g = max(1, int(group))
    refs = [task.remote(shared, users[s:s + g], options, max(1, int(num_cpus)), device)
            for s in range(0, len(users), g)]
    return [r for part in ray.get(refs) for r in part]
