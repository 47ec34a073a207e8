"""The shipped real-model configs, run on CPU: a mistake in them is caught here before a GPU user
meets it.

Each config runs as shipped (its backend, ranks, ZeRO stage, gradient checkpointing, bf16, KL mode,
reference transport, rollout_ahead and pi_old path, rewards, chat template) on a tiny random-weight
model of Qwen2.5's architecture (tests/tiny_qwen.py: tied output head, Qwen2.5's 151,936-row
vocabulary, bf16). What the overrides change, and nothing else:
- the paths a user supplies (model.path, data.train_path, data.eval_path, output_dir);
- every role's num_gpus to 0 (vLLM then runs its CPU build, which needs rollout.kv_cache_gb);
- the size: 2 steps of 4 prompts, 16 new tokens, 4 held-out prompts, a checkpoint at step 2.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.slow, pytest.mark.leaves_no_actors]

CPU = ["rollout.num_gpus=0", "reference.num_gpus=0", "learner.num_gpus=0", "rollout.kv_cache_gb=0.25"]
SIZE = ["trainer.steps=2", "trainer.prompts_per_step=4", "rollout.max_new_tokens=16", "eval.size=4",
        "checkpoint.every=2"]


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    from tests.tiny_qwen import build_tiny_qwen

    return build_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen2.5"))


def _write(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _datasets(tmp_path, style: str) -> list[str]:
    """Rows in the fields the config's comment block names."""
    rows = []
    for a in range(1, 13):
        b = a % 5 + 2
        if style == "gsm8k":
            rows.append({"question": f"Tom has {a} apples and buys {b} more. How many now?",
                         "answer": f"He has {a}+{b} = {a + b}.\n#### {a + b}"})
        else:
            rows.append({"problem": f"What is ${a} + {b}$?", "solution": f"${a}+{b}=\\boxed{{{a + b}}}$"})
    return [f"data.train_path={_write(tmp_path / 'train.jsonl', rows[:8])}",
            f"data.eval_path={_write(tmp_path / 'test.jsonl', rows[8:])}"]


@pytest.mark.parametrize("config, style", [("configs/qwen2.5-0.5b-gsm8k.yaml", "gsm8k"),
                                           ("configs/qwen2.5-1.5b-math.yaml", "math")])
def test_shipped_config_runs_two_steps_on_cpu(actor_pool, tiny_qwen, tmp_path, capsys, config, style):
    from system.config import load_config
    from system.train import main

    overrides = [f"model.path={tiny_qwen}", *_datasets(tmp_path, style), f"output_dir={tmp_path}",
                 *CPU, *SIZE]
    shipped = load_config(config, [f"model.path={tiny_qwen}", *_datasets(tmp_path, style)])
    assert shipped.model.dtype == "bfloat16" and shipped.learner.gradient_checkpointing
    rc = main(["--config", config, *overrides], pool=actor_pool)  # the pool's actors make room
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    run = tmp_path / shipped.run_name
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and train[-1]["policy_version"] == 2
    assert all(r["kl_full"] >= 0 and r["updates_skipped"] == 0 for r in train)
    assert train[0]["staleness"] == 0 and train[1]["staleness"] == shipped.trainer.rollout_ahead
    assert (run / "checkpoints" / "step_000002").is_dir()
    assert (run / "final" / "config.json").exists()
    saved = (run / "config.yaml").read_text()
    assert "backend: gloo" in saved and f"zero_stage: {shipped.learner.zero_stage}" in saved
