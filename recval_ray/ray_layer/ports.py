"""The Ray implementation of the core's :class:`~recval_ray.core.ports.Distributed` port."""
from __future__ import annotations


class RayPorts:
    """Ray Data batch inference, Ray tasks and actors behind the core's port."""

    name = "ray"

    def explain_batches(self, explainer, *, actors, batch_users, num_cpus, num_gpus):
        from .explain import explain_with_ray_data
        return explain_with_ray_data(explainer, actors=actors, batch_users=batch_users, num_cpus=num_cpus,
                                     num_gpus=num_gpus)

    def reference_shapley(self, game, players, users, *, group, num_cpus, num_gpus, **options):
        from .explain import reference_with_ray
        return reference_with_ray(game, players, users, group=group, num_cpus=num_cpus, num_gpus=num_gpus,
                                  **options)

    def checkpoint_scores(self, checkpoints, indices, train, queries, spec, *, num_cpus, num_gpus, device,
                          max_concurrent, on_result):
        from .tracin import checkpoint_scores_on_ray
        return checkpoint_scores_on_ray(checkpoints, indices, train, queries, spec, num_cpus=num_cpus,
                                        num_gpus=num_gpus, device=device, max_concurrent=max_concurrent,
                                        on_result=on_result)
