"""TracIn on Ray: one actor per checkpoint.

:func:`checkpoint_scores_on_ray` puts the training examples and the queries in the object store
once and starts one :class:`CheckpointActor` per checkpoint (``num_cpus`` CPUs each, torch using
as many threads; a GPU share each when the cluster has GPUs: by default the cluster's GPUs
divided among the checkpoint actors, at most one each). Each actor computes, with the Ray-free
:func:`recval_ray.core.valuers.tracin.scores.checkpoint_scores`, its checkpoint's training-gradient factors tile
by tile and the query gradients, and returns its lr-weighted partial score matrix
``[training examples, queries]`` and self-influence; no actor ever holds a train x test gradient
matrix. Actors that do not fit the cluster at once wait for resources, and each is killed as
soon as its result is in, which frees its CPUs for the next (``max_concurrent`` bounds how
many are alive at once, e.g. the machine's cores when Ray advertises more). The caller sums the partials in
checkpoint order (:func:`recval_ray.core.valuers.tracin.scores.sum_partials`), so the scores are the in-process
path's whatever the number of actors or the order they finish.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch

from ..core.valuers.tracin.scores import Checkpoint, Examples, Queries, TracInSpec, checkpoint_scores

log = logging.getLogger("recval_ray")


class CheckpointActor:
    """Scores one checkpoint (Ray actor class; Ray-free logic in :mod:`recval_ray.core.valuers.tracin.scores`)."""

    def __init__(self, data, checkpoint: Checkpoint, index: int, spec: TracInSpec, threads: int = 1,
                 device: Optional[str] = None):
        import copy

        import ray
        if isinstance(data, ray.ObjectRef):
            data = ray.get(data)
        data = copy.deepcopy(data)          # arrays from the object store are read-only views
        torch.set_num_threads(max(1, int(threads)))
        if device is None:
            device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.train, self.queries = data
        self.checkpoint, self.index, self.spec, self.device = checkpoint, int(index), spec, device

    def run(self) -> dict:
        return checkpoint_scores(self.checkpoint, self.index, self.train, self.queries, self.spec, self.device)


def checkpoint_scores_on_ray(checkpoints: Sequence[Checkpoint], indices: Sequence[int], train: Examples,
                             queries: Optional[Queries], spec: TracInSpec, *, num_cpus: float = 1.0,
                             num_gpus: Optional[float] = None, device: Optional[str] = None,
                             max_concurrent: int = 0,
                             on_result: Optional[Callable[[int, dict], None]] = None) -> list[dict]:
    """The partials of ``checkpoints`` (``indices``: each one's checkpoint index, which seeds its
    random projection), one Ray actor each, at most ``max_concurrent`` alive at a time (0: as
    many as the cluster's resources admit); returned in the order given. ``on_result(j,
    partial)`` runs in the driver as each finishes (any order)."""
    import ray

    from .explain import cluster_gpus

    if not checkpoints:
        return []
    have = cluster_gpus()
    if num_gpus is None:
        gpus = min(1.0, have / len(checkpoints)) if have > 0 else 0.0
    else:
        gpus = float(num_gpus)
    if gpus > 0 and device == "cpu":
        gpus = 0.0
    Actor = ray.remote(CheckpointActor).options(num_cpus=num_cpus, num_gpus=gpus)
    data = ray.put((train, queries))
    threads = max(1, int(num_cpus))
    actor_device = None if gpus > 0 else (device or "cpu")     # None: cuda when the actor got a GPU
    limit = len(checkpoints) if max_concurrent <= 0 else int(max_concurrent)
    todo = list(range(len(checkpoints)))[::-1]
    running: dict = {}
    out: list = [None] * len(checkpoints)

    def start():
        j = todo.pop()
        actor = Actor.remote(data, checkpoints[j], int(indices[j]), spec, threads, actor_device)
        running[actor.run.remote()] = (j, actor)

    try:
        while todo and len(running) < limit:
            start()
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            j, actor = running.pop(ready[0])
            out[j] = ray.get(ready[0])
            ray.kill(actor)          # frees its resources for the next checkpoint's actor
            if on_result is not None:
                on_result(j, out[j])
            if todo:
                start()
    finally:
        for _, actor in running.values():
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
    return out
