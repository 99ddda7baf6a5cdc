"""A pool of Ray actors running a valuer's independent work items.

``ActorPoolExecutor(n).map(fn, shared, items, on_result)``: ``shared`` (the training data,
configs) goes to the object store once and every actor resolves it once at start; items are
handed to whichever actor is free and ``on_result(i, result)`` runs in the driver as each
finishes (in any order: valuers assemble by item index, so the output does not depend on the
number of actors or on finishing order). An actor that dies is replaced and its item retried
(``max_retries`` times). Each actor holds ``num_cpus`` CPUs (torch uses as many threads) and
``num_gpus`` GPUs (work on ``cuda`` when > 0).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

log = logging.getLogger("recval_ray")


def _worker_class():
    import ray

    @ray.remote
    class Worker:
        def __init__(self, fn, shared, threads: int):
            import copy

            import torch
            torch.set_num_threads(max(1, int(threads)))
            # arrays from the object store are read-only views; the work gets its own copy
            self.fn, self.shared = fn, copy.deepcopy(shared)

        def run(self, item):
            return self.fn(self.shared, item)

    return Worker


class ActorPoolExecutor:
    def __init__(self, workers: int, num_cpus: float = 1.0, num_gpus: float = 0.0, max_retries: int = 2):
        self.workers = max(1, int(workers))
        self.num_cpus, self.num_gpus = float(num_cpus), float(num_gpus)
        self.max_retries = int(max_retries)

    def map(self, fn: Callable, shared: Any, items: Sequence, on_result: Callable[[int, Any], None]) -> None:
        import ray
        from ray.exceptions import RayActorError

        if not items:
            return
        Worker = _worker_class().options(num_cpus=self.num_cpus, num_gpus=self.num_gpus)
        ref = ray.put(shared)
        threads = max(1, int(self.num_cpus))
        n = min(self.workers, len(items))
        actors = [Worker.remote(fn, ref, threads) for _ in range(n)]
        queue = list(range(len(items)))[::-1]
        retries = [0] * len(items)
        running: dict = {}

        def submit(actor):
            i = queue.pop()
            running[actor.run.remote(items[i])] = (i, actor)

        try:
            for a in actors:
                if queue:
                    submit(a)
            while running:
                ready, _ = ray.wait(list(running), num_returns=1)
                fut = ready[0]
                i, actor = running.pop(fut)
                try:
                    res = ray.get(fut)
                except RayActorError:
                    retries[i] += 1
                    if retries[i] > self.max_retries:
                        raise
                    log.warning("work item %d lost with its actor; retrying (%d/%d)", i, retries[i], self.max_retries)
                    actor = Worker.remote(fn, ref, threads)
                    queue.append(i)
                    submit(actor)
                    continue
                on_result(i, res)
                if queue:
                    submit(actor)
        finally:
            for a in actors:
                ray.kill(a)
