"""A pool of Ray actors running a valuer's independent work items.

``ActorPoolExecutor(n).map(fn, shared, items, on_result)``: ``shared`` (the training data,
configs) goes to the object store once and every actor resolves it once at start; items are
handed to whichever actor is free and ``on_result(i, result)`` runs in the driver as each
finishes (in any order: valuers assemble by item index, so the output does not depend on the
number of actors or on finishing order). An actor that dies is replaced and its item retried
(``max_retries`` times per item): an actor's process killed, its node lost, or the result lost
with the node (``RayActorError``, ``WorkerCrashedError``, ``NodeDiedError``, ``ObjectLostError``);
an exception raised by the work function itself is raised at once. Before the replacement
starts, the lost actor's node is probed until it answers or is declared dead (a node that died
stays listed alive for some seconds, and a replacement placed there would be lost too).

Each actor holds ``num_cpus`` CPUs (torch uses as many threads) and ``num_gpus`` GPUs (work on
``cuda`` when > 0), and optionally custom ``resources`` (e.g. ``{"worker": 1}`` to keep actors
off a head node) and a ``scheduling_strategy`` (e.g. ``"SPREAD"``: one actor per node where
possible).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

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

        def node(self):
            import ray
            return ray.get_runtime_context().get_node_id()

    return Worker


def _settle(node_id: str, timeout: float) -> str:
    """After an actor on ``node_id`` was lost: wait until that node is known alive (a probe
    task runs there) or dead (the probe fails once the cluster has declared it dead), so that
    the replacement is not placed on a node that is gone but not yet declared dead. Returns
    ``alive``, ``dead`` or ``unknown`` (no answer within ``timeout`` seconds)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_retries=0)
    def probe():
        return True

    ref = probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()
    try:
        ray.get(ref, timeout=timeout)
        return "alive"
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        return "unknown"
    except Exception:  # noqa: BLE001 - unschedulable / node died: the node is gone
        return "dead"


def _lost_errors() -> tuple:
    """Errors of the machinery (the actor, its process, its node or the result object lost),
    after which an item is retried on a new actor; anything else is the work's own error."""
    from ray import exceptions as rex
    return (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError,
            rex.LocalRayletDiedError)


class ActorPoolExecutor:
    def __init__(self, workers: int, num_cpus: float = 1.0, num_gpus: float = 0.0, max_retries: int = 2,
                 resources: Optional[dict] = None, scheduling_strategy: Optional[str] = None,
                 settle_s: float = 60.0):
        self.workers = max(1, int(workers))
        self.num_cpus, self.num_gpus = float(num_cpus), float(num_gpus)
        self.max_retries = int(max_retries)
        self.resources, self.scheduling_strategy = resources, scheduling_strategy
        self.settle_s = float(settle_s)

    def map(self, fn: Callable, shared: Any, items: Sequence, on_result: Callable[[int, Any], None]) -> None:
        import ray

        if not items:
            return
        lost = _lost_errors()
        extra = {}
        if self.resources:
            extra["resources"] = dict(self.resources)
        if self.scheduling_strategy:
            extra["scheduling_strategy"] = self.scheduling_strategy
        Worker = _worker_class().options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, **extra)
        ref = ray.put(shared)
        threads = max(1, int(self.num_cpus))
        n = min(self.workers, len(items))
        actors = []
        where: dict = {}         # actor -> ref of the id of the node it runs on

        def start():
            a = Worker.remote(fn, ref, threads)
            actors.append(a)
            where[a] = a.node.remote()
            return a

        for _ in range(n):
            start()
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
                except lost as e:
                    retries[i] += 1
                    if retries[i] > self.max_retries:
                        raise
                    node = _node_of(where.get(actor))
                    state = _settle(node, self.settle_s) if node else "unknown"
                    log.warning("work item %d lost with its actor (%s; its node %s: %s); retrying on a new "
                                "actor (%d/%d)", i, type(e).__name__, (node or "?")[:12], state, retries[i],
                                self.max_retries)
                    _kill(actor)
                    actor = start()
                    queue.append(i)
                    submit(actor)
                    continue
                on_result(i, res)
                if queue:
                    submit(actor)
        finally:
            for a in actors:
                _kill(a)


def _node_of(ref) -> Optional[str]:
    """The node id an actor reported at start, if it did."""
    import ray
    if ref is None or not ray.wait([ref], timeout=0)[0]:
        return None
    try:
        return ray.get(ref)
    except Exception:  # noqa: BLE001 - the actor died before it answered
        return None


def _kill(actor) -> None:
    """``ray.kill`` that ignores an actor already gone (e.g. with its node)."""
    import ray
    try:
        ray.kill(actor)
    except Exception as e:  # noqa: BLE001 - nothing left to stop
        log.debug("ray.kill: %s", e)
