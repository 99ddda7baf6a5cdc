"""Ports: what a distributed runtime offers the Ray-free core.

The core never imports Ray. A valuer that can hand work to a cluster asks the context for a
:class:`Distributed` port (``ValuationContext.distributed``; ``None``: this process only) and
calls it; the Ray layer implements it (:class:`recval_ray.ray_layer.ports.RayPorts`) and the
pipeline passes it in when the job runs on Ray. Independent work items go through the other
port, ``ValuationContext.executor`` (:mod:`recval_ray.core.executor`).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, Sequence


class Distributed(Protocol):
    """Batch inference and grouped tasks on a cluster, for the valuers that use them."""

    name: str

    def explain_batches(self, explainer: Any, *, actors: int, batch_users: int, num_cpus: float,
                        num_gpus: Optional[float]) -> Any:
        """Shapley values of every player of a trained FastSHAP explainer, in the order of
        :func:`recval_ray.core.shapley.fastshap.explain` (float64 tensor on the CPU)."""

    def reference_shapley(self, game: Any, players: Any, users: Sequence[int], *, group: int,
                          num_cpus: float, num_gpus: float, **options) -> list:
        """:func:`recval_ray.core.shapley.reference.user_reference` of each user, in order."""

    def checkpoint_scores(self, checkpoints: Sequence[Any], indices: Sequence[int], train: Any, queries: Any,
                          spec: Any, *, num_cpus: float, num_gpus: Optional[float], device: Optional[str],
                          max_concurrent: int, on_result: Callable[[int, dict], None]) -> list:
        """TracIn partial scores of each checkpoint (:func:`recval_ray.core.valuers.tracin.scores.checkpoint_scores`)."""
