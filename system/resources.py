"""What a run asks of the Ray cluster, checked before any model loads.

    needed = required_resources(cfg)                         # {"CPU": 4.0, "GPU": 4.0}
    check_cluster_resources(cfg, ray.cluster_resources())    # raises ResourceError if it cannot fit

Steps: (1) add up CPU, GPU and the custom resources (`<group>.resources`, which place a group on
the nodes started with them) over the actor groups (rollout, reference, learner), each group being
its number of actors times the per-actor amount in the config; (2) compare each total with the
cluster's; (3) on a shortfall, name the group that asks the most of the missing resource, its two
config keys, what the cluster has, and the per-group breakdown, in one line.

Without this check Ray would wait forever for a placement group that can never be scheduled; a
plain error at start-up is kinder. Reward workers are processes inside the driver, not Ray actors,
and the driver itself reserves nothing (ray job submit's default), so neither is counted.
Totals only: an actor that needs more GPUs than any single node has still passes here.
"""

from __future__ import annotations

from dataclasses import dataclass

from system.config import Config

RESOURCES = ("CPU", "GPU")


class ResourceError(ValueError):
    """The cluster cannot hold the actors the config asks for; the message is one line."""


@dataclass(frozen=True)
class _Group:
    name: str  # rollout | reference | learner
    count_key: str  # config key holding the number of actors
    count: int
    per_actor: dict  # {"CPU": x, "GPU": y, custom resource: z, ...} per actor

    def need(self, resource: str) -> float:
        return self.count * self.per_actor.get(resource, 0.0)

    def key(self, resource: str) -> str:
        """The config key of the per-actor amount of `resource`."""
        if resource in RESOURCES:
            return f"{self.name}.num_{resource.lower()}s"
        return f"{self.name}.resources.{resource}"


def _groups(cfg: Config) -> list:
    r, ref, lr = cfg.rollout, cfg.reference, cfg.learner
    return [
        _Group("rollout", "rollout.num_workers", r.num_workers,
               {"CPU": r.num_cpus, "GPU": r.num_gpus, **r.resources}),
        # reference.source=adapters_off: pi_ref comes from the learners, no reference workers
        _Group("reference", "reference.num_workers", 0 if ref.source == "adapters_off" else ref.num_workers,
               {"CPU": ref.num_cpus, "GPU": ref.num_gpus, **ref.resources}),
        _Group("learner", "learner.num_ranks", lr.num_ranks,
               {"CPU": lr.num_cpus, "GPU": lr.num_gpus, **lr.resources}),
    ]


def _resources(groups: list) -> list:
    """CPU, GPU, then the custom resources any group asks for, by name."""
    return [*RESOURCES, *sorted({k for g in groups for k in g.per_actor} - set(RESOURCES))]


def _fmt(x: float) -> str:
    """1.0 -> "1", 0.5 -> "0.5": counts read as counts."""
    return f"{x:g}"


def required_resources(cfg: Config) -> dict:
    """{"CPU": x, "GPU": y, custom: z, ...}: the sum over actor groups of actors x per-actor amount."""
    groups = _groups(cfg)
    return {res: float(sum(g.need(res) for g in groups)) for res in _resources(groups)}


def check_cluster_resources(cfg: Config, available: dict) -> None:
    """Raise ResourceError when the cluster's totals (e.g. ray.cluster_resources()) are too small.

    A resource missing from `available` counts as 0 (Ray omits "GPU" on a CPU-only cluster).
    """
    groups = _groups(cfg)
    for res in _resources(groups):
        needed = sum(g.need(res) for g in groups)
        have = float(available.get(res, 0.0))
        if needed <= have + 1e-9:
            continue
        worst = max(groups, key=lambda g: g.need(res))
        breakdown = " + ".join(f"{g.name} {_fmt(g.need(res))}" for g in groups)
        raise ResourceError(
            f"{worst.name}: {_fmt(worst.need(res))} {res} needed "
            f"({worst.count_key}={worst.count} x {worst.key(res)}={_fmt(worst.per_actor[res])}), "
            f"cluster has {_fmt(have)} {res} in all ({breakdown} = {_fmt(needed)} needed)"
        )
