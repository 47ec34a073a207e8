"""The learner's DeepSpeed engine on CPU as the GPU configs run it: a tied output head (both Qwen2.5
configs tie it), gradient checkpointing, ZeRO-2 and ZeRO-3, and every path that computes pi_old in
the learner (trainer.rollout_ahead=0; algo.pi_old=proximal); and gradients accumulated over
token-budget micro-batches between DeepSpeed's accumulation boundaries (ZeRO-0 and ZeRO-3). One
process per stage (tests/integration/learner_probe.py), since DeepSpeed's process group is global."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    from tests.tiny_qwen import build_tiny_qwen

    return build_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen"), vocab_size=512, dtype="float32")


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_update_trains_with_checkpointing_and_pi_old_paths_work_with_a_tied_head(tied_model, zero_stage):
    check_learner_probe(tied_model, zero_stage)


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_gradients_accumulated_over_micro_batches_give_the_same_update(tied_model, zero_stage):
    """One SGD step as one padded micro-batch, and as three token-budget micro-batches and a
    stand-in (loss x 0) with DeepSpeed accumulating between accumulation boundaries: the same
    weights after it (float32)."""
    probe = run_learner_probe(tied_model, zero_stage, "accumulate")
    assert probe["max_delta"] > 1e-4
    assert probe["max_diff"] <= 1e-5 * max(1.0, probe["max_delta"] * 100)


def run_learner_probe(model_path: str, zero_stage: int, *mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tests.integration.learner_probe", model_path,
                           str(zero_stage), *mode], cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("PROBE "):])


def check_learner_probe(model_path: str, zero_stage: int) -> None:
    """Run learner_probe.py in a process of its own (also from tests/gpu) and check what it saw."""
    probe = run_learner_probe(model_path, zero_stage)
    # the update runs in training mode, so every layer call goes through activation checkpointing
    # (2 minibatches x 2 layers in the first update); pi_old / pi_prox / pi_ref in eval mode
    assert probe["training"] == {"prepare": [False], "update": [True]}
    assert probe["checkpointed_update"] == 4
    # backward re-runs each checkpointed layer's forward: twice the forward calls of prepare
    assert probe["layer_calls"] == {"prepare": 8, "update": 16}
    # pi_old (no sampler log-probs) and pi_prox equal the model's own tempered log-softmax
    assert probe["pi_old_err"] < 1e-5 and probe["pi_prox_err"] < 1e-5
