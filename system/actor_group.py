"""ActorGroup: a placement group and ranks for a group of identical Ray actors.

The driver calls a group as if it were one object: `group.call("method", *args)` runs the method
on every actor and returns their results in rank order; `group.call_each("method", [args...])`
gives each rank its own arguments. Actor classes are named by "module:Class" so that `system`
never imports the heavy worker modules itself. With max_restarts != 0 (-1: always), Ray restarts
an actor whose process dies (same constructor arguments, same placement bundle); calls in flight
fail, and the driver decides what to redo (system/faults.py).
"""

from __future__ import annotations

import importlib
from typing import Any

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


PLACEMENT_TIMEOUT_S = 600.0  # a group not placed in this long is an error (the cluster is busy)
_PLACEMENT_NOTICE_S = 15.0  # after this long, say what the group waits for


def _wait_placed(pg, name: str, num: int, bundle: dict, timeout_s: float = PLACEMENT_TIMEOUT_S) -> None:
    """Wait for the group's placement group. The cluster's totals were checked before (system/
    resources.py), so a wait means other actors or jobs hold what it needs: say so after a few
    seconds, and stop with one line naming the group and what is free after timeout_s."""
    from system.resources import ResourceError

    ready = pg.ready()
    if ray.wait([ready], timeout=min(_PLACEMENT_NOTICE_S, timeout_s))[0]:
        return
    want = f"the {name} group ({num} x {_fmt(bundle)})"
    print(f"[placement] waiting for {want}: the cluster has {_fmt(ray.available_resources())} free "
          f"now, other actors or jobs hold the rest", flush=True)
    if ray.wait([ready], timeout=max(0.0, timeout_s - _PLACEMENT_NOTICE_S))[0]:
        return
    free = _fmt(ray.available_resources())
    remove_placement_group(pg)
    raise ResourceError(f"{want} could not be placed in {timeout_s:g}s: the cluster has {free} free; "
                        f"stop what holds the rest, or ask for less ({name}.num_cpus, {name}.num_gpus)")


def _fmt(resources: dict) -> str:
    """CPU, GPU and custom resources, without Ray's per-node, memory and placement-group entries."""
    skip = ("node:", "memory", "object_store_memory", "accelerator_type:")
    shown = {k: v for k, v in resources.items() if not k.startswith(skip) and "_group_" not in k}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


def _load(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class ActorGroup:
    def __init__(self, name: str, cls_path: str, num: int, num_cpus: float, num_gpus: float,
                 make_args, env: dict | None = None, strategy: str = "PACK", max_restarts: int = 0,
                 resources: dict | None = None):
        """make_args(rank) -> (args, kwargs) for the actor's constructor. `resources`: custom Ray
        resources per actor, which only the nodes started with them hold (placement by node)."""
        self.name = name
        resources = dict(resources or {})
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {}), **resources}
        # an empty group (no reference workers with reference.source=adapters_off) places nothing
        self.pg = placement_group([dict(bundle) for _ in range(num)], strategy=strategy) if num else None
        if self.pg is not None:
            _wait_placed(self.pg, name, num, bundle)
        env = dict(env or {})
        if not num_gpus:  # Ray 2.60 leaves a GPU node's devices visible to an actor with none
            env["CUDA_VISIBLE_DEVICES"] = ""
        remote_cls = ray.remote(_load(cls_path))
        self._make_args = make_args
        self._options = lambda rank: remote_cls.options(
            num_cpus=num_cpus, num_gpus=num_gpus, resources=resources, max_restarts=max_restarts,
            runtime_env={"env_vars": env},
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=rank))
        self.actors = [self._new(rank) for rank in range(num)]

    def _new(self, rank: int):
        args, kwargs = self._make_args(rank)
        return self._options(rank).remote(*args, **kwargs)

    def replace(self, rank: int) -> None:
        """A new actor for `rank`, in the same placement bundle, built as the first was: what a
        restart gives, for an actor Ray will not restart (killed for good, or whose constructor
        failed); the old one is killed for good first."""
        ray.kill(self.actors[rank], no_restart=True)
        self.actors[rank] = self._new(rank)

    def __len__(self) -> int:
        return len(self.actors)

    def call_async(self, method: str, *args, **kwargs) -> list:
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def call(self, method: str, *args, **kwargs) -> list[Any]:
        return ray.get(self.call_async(method, *args, **kwargs))

    def call_each_async(self, method: str, per_rank: list[tuple]) -> list:
        return [getattr(a, method).remote(*args) for a, args in zip(self.actors, per_rank)]

    def call_each(self, method: str, per_rank: list[tuple]) -> list[Any]:
        return ray.get(self.call_each_async(method, per_rank))

    def nodes(self) -> list:
        """The id of the node each rank's bundle is placed on, in rank order."""
        if self.pg is None:
            return []
        where = placement_group_table(self.pg)["bundles_to_node_id"]
        return [where.get(rank) for rank in range(len(self.actors))]

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        if self.pg is not None:
            remove_placement_group(self.pg)

    def init_collective(self) -> None:
        """Rank 0 picks the address of the group's collective; every rank then joins it."""
        host, port = ray.get(self.actors[0].address.remote())
        self.call("init_process_group", host, port)


def placement_line(*groups: ActorGroup) -> str:
    """Where each group's ranks run, e.g. `rollout: 0@node 1a2b3c (10.0.0.2) | learner: 0,1@node
    4d5e6f (10.0.0.3)`: on a cluster, the check that a placement config did what it says."""
    address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    parts = []
    for group in (g for g in groups if len(g)):
        ranks: dict = {}
        for rank, node in enumerate(group.nodes()):
            ranks.setdefault(node, []).append(str(rank))
        where = [f"{','.join(r)}@node {str(node)[:6]} ({address.get(node, '?')})"
                 for node, r in ranks.items()]
        parts.append(f"{group.name}: {', '.join(where)}")
    return " | ".join(parts)
