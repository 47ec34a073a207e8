"""Shared helpers: trainers built on the session's Ray cluster (the `ray_cluster` fixture is in
tests/conftest.py, shared with tests/faults)."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

# A short warm start: these tests check the pipeline, not how well the policy learns.
TEST_OVERRIDES = ["model.debug_settings={warm_start: {steps: 30}}", "eval.size=16",
                  "trainer.progress_bar=false", "trainer.prompts_per_step=8", "rollout.group_size=4",
                  "learner.minibatches=1"]


def build_trainer(tmp_path, overrides=()):
    """A started Trainer for configs/debug.yaml with the test overrides; call stop_trainer after."""
    from transformers import AutoTokenizer

    from system.config import load_config
    from system.data.prompts import load_prompt_sets
    from system.rewards.pool import RewardPool
    from system.train import resolve_model
    from system.trainer import Trainer

    cfg = load_config("configs/debug.yaml",
                      [*TEST_OVERRIDES, f"output_dir={tmp_path}", *overrides])
    model_path = resolve_model(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    trainer = Trainer(cfg, model_path, tokenizer, load_prompt_sets(cfg, tokenizer),
                      str(tmp_path / cfg.run_name))
    trainer.rewards = RewardPool([{"name": "exact"}], num_workers=0)
    trainer.start_actors()
    return trainer


def stop_trainer(trainer) -> None:
    trainer.rewards.close()
    trainer.stop_actors()
