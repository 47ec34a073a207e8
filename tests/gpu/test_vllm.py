"""What only a GPU has: vLLM's GPU engine (CUDA memory, CUDA graphs), NCCL weight sync from a
DeepSpeed learner into it, a short run. The same paths on CPU (gloo) are tests/vllm.

Run on a machine with a CUDA GPU and the `gpu` extra (vllm==0.32.0): `pytest tests/gpu -q`.
"""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import TEST_OVERRIDES
from tests.vllm.conftest import learner_greedy

GPU_OVERRIDES = ["rollout.backend=vllm", "rollout.num_gpus=0.3", "rollout.gpu_memory_utilization=0.2",
                 "learner.num_gpus=0.3", "learner.num_ranks=1", "reference.num_gpus=0.1",
                 "sync.backend=nccl"]


def test_vllm_rollout_samples_groups_from_debug_model(tmp_path):
    from system.debug_model import ensure_debug_model
    from workers.rollout import RolloutWorker

    path = ensure_debug_model(str(tmp_path / "cache"), {"warm_start": {"steps": 30}})
    worker = RolloutWorker(path, "vllm", "float32", torch_threads=1, seed=0,
                           vllm_kwargs={"gpu_memory_utilization": 0.2})
    out = worker.generate([[1, 2, 3], [4, 5, 6]], 4, seed=0, max_new_tokens=6, want_logprobs=True)
    assert len(out["responses"]) == 8 and out["version"] == 0
    assert all(1 <= len(r) <= 6 for r in out["responses"])
    assert [len(x) for x in out["logprobs"]] == [len(r) for r in out["responses"]]


def test_sync_into_vllm_gives_learner_greedy_output(ray_cluster, tmp_path):
    from tests.integration.conftest import build_trainer, stop_trainer

    trainer = build_trainer(tmp_path, GPU_OVERRIDES + ["learner.lr=1e-2"])
    try:
        rows = trainer.sampler.next(8)
        batch_prompts = [r["prompt_ids"] for r in rows]
        from tests.integration.test_pipeline import _one_batch

        batch, rewards = _one_batch(trainer)
        trainer.learn(batch, rewards, trainer.reference_rows(batch))
        trainer.version += 1
        trainer.sync_weights()  # raises on a checksum mismatch
        vllm_greedy = trainer.generate(batch_prompts, 1, seed=0, greedy=True, max_new_tokens=6)
        assert vllm_greedy == learner_greedy(trainer, batch_prompts, 6, device="cuda")
    finally:
        stop_trainer(trainer)


def test_three_step_run_with_vllm_backend(ray_cluster, tmp_path):
    from system.train import main

    rc = main(["--config", "configs/debug.yaml", *TEST_OVERRIDES, *GPU_OVERRIDES, "trainer.steps=3",
               f"output_dir={tmp_path}", "run_name=gpu"])
    assert rc == 0
    lines = [json.loads(x) for x in (tmp_path / "gpu" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == [1, 2, 3]


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()
