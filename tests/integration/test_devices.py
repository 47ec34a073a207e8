"""Where each actor computes: the accelerators Ray assigned it, never a GPU it was not given."""

from __future__ import annotations

import os
import types

import torch


class DeviceProbe:
    """A stand-in actor: what a worker's set-up decides in its process."""

    def report(self) -> dict:
        from workers.common import setup_process

        return {"device": str(setup_process(1, 0)),
                "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}


def _fake_ray_actor(monkeypatch, gpu_ids: list) -> None:
    """This process as a Ray actor assigned `gpu_ids`, on a node whose CUDA devices are visible."""
    import ray

    context = types.SimpleNamespace(get_actor_id=lambda: "actor",
                                    get_accelerator_ids=lambda: {"GPU": list(gpu_ids)})
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: context)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_an_actor_given_no_gpu_computes_on_the_cpu_on_a_gpu_node(monkeypatch):
    from workers.common import setup_process

    _fake_ray_actor(monkeypatch, [])
    assert setup_process(1, 0) == torch.device("cpu")


def test_an_actor_given_a_gpu_computes_on_it(monkeypatch):
    from workers.common import setup_process

    _fake_ray_actor(monkeypatch, ["3"])  # Ray makes it the only visible device: index 0
    assert setup_process(1, 0) == torch.device("cuda", 0)


def test_zero_gpu_actors_are_started_with_the_gpus_hidden(ray_cluster):
    import ray

    from system.actor_group import ActorGroup

    group = ActorGroup("probe", "tests.integration.test_devices:DeviceProbe", 1, 0.1, 0,
                       lambda rank: ((), {}))
    try:
        assert ray.get(group.actors[0].report.remote()) == {"device": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    finally:
        group.shutdown()
