"""What only a GPU has, on ONE GPU: vLLM's GPU engine (CUDA memory, CUDA graphs), weight sync from a
DeepSpeed learner on CUDA into it, bf16 with a tied output head, ZeRO-3 and gradient checkpointing
(the shipped gsm8k config, sized for one GPU), and the sampler/learner log-prob gap in bf16 with
vLLM's output head in float32 and in bf16. The same paths on CPU are tests/vllm and
tests/integration/test_real_configs.py.

Every role gets a fraction of the one GPU, so the weight sync runs over gloo (sync.backend=auto
picks it: NCCL refuses two ranks of a group on one device). Run everything with
`bash tests/gpu/run_on_gpu.sh` (under 10 minutes), or `pytest tests/gpu -q` where the `gpu` extra
is installed.
"""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import TEST_OVERRIDES
from tests.vllm.conftest import learner_greedy

# one GPU shared by the roles: fractions, one learner rank (DeepSpeed's NCCL group then has one rank)
GPU_OVERRIDES = ["rollout.backend=vllm", "rollout.num_gpus=0.4", "rollout.gpu_memory_utilization=0.3",
                 "learner.num_gpus=0.3", "learner.num_ranks=1", "reference.num_gpus=0.1"]


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
        assert trainer.cfg.sync.backend == "gloo"  # roles share the GPU
        trainer.actors.sync(trainer.version)  # raises on a checksum mismatch
        vllm_greedy = trainer.generate(batch_prompts, 1, seed=0, greedy=True, max_new_tokens=6)
        assert vllm_greedy == learner_greedy(trainer, batch_prompts, 6, device="cuda")
    finally:
        stop_trainer(trainer)


def test_three_step_debug_run_with_vllm_backend(ray_cluster, tmp_path):
    train = _run(tmp_path, "configs/debug.yaml", "gpu", [*TEST_OVERRIDES, *GPU_OVERRIDES, "trainer.steps=3"])
    assert [r["step"] for r in train] == [1, 2, 3]


def _run(tmp_path, config: str, name: str, overrides: list[str]) -> list[dict]:
    from system.train import main

    rc = main(["--config", config, *overrides, f"output_dir={tmp_path}", f"run_name={name}"])
    assert rc == 0
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.mark.parametrize("head_dtype", ["float32", "model"])
def test_shipped_gsm8k_config_on_one_gpu_bf16_tied_zero3_checkpointing(ray_cluster, tmp_path, capsys,
                                                                          head_dtype):
    """configs/qwen2.5-0.5b-gsm8k.yaml on a tiny tied Qwen2.5-architecture model in bf16, with
    ZeRO-3, gradient checkpointing and vLLM; behavior_logp_gap at step 1 (same weights on both
    sides) is what bf16 costs the ratio: printed for the record, bounded loosely."""
    from tests.integration.test_real_configs import _datasets
    from tests.tiny_qwen import build_tiny_qwen

    model = build_tiny_qwen(tmp_path / "model")
    train = _run(tmp_path, "configs/qwen2.5-0.5b-gsm8k.yaml", f"gsm8k-{head_dtype}", [
        f"model.path={model}", *_datasets(tmp_path, "gsm8k"), *GPU_OVERRIDES,
        "learner.zero_stage=3", "trainer.steps=3", "trainer.prompts_per_step=8",
        "rollout.max_new_tokens=64", "eval.size=8", f"rollout.head_dtype={head_dtype}"])
    assert [r["step"] for r in train] == [1, 2, 3]
    gap = train[0]["behavior_logp_gap"]
    with capsys.disabled():
        print(f"\n[gpu] behavior_logp_gap at step 1, bf16 model, vLLM head {head_dtype}: {gap:.3e}")
    assert gap < 0.2


def test_learner_engine_on_cuda_zero3_tied_head_checkpointing(tmp_path):
    """tests/integration/learner_probe.py on the GPU: training mode and checkpointing during the
    update, pi_old and pi_prox from a tied head under ZeRO-3 (NCCL, one rank)."""
    from tests.integration.test_learner_engine import check_learner_probe
    from tests.tiny_qwen import build_tiny_qwen

    check_learner_probe(build_tiny_qwen(tmp_path, vocab_size=512, dtype="float32"), 3)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()
