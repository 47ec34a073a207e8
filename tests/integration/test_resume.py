"""Checkpoints and resume: an interrupted run resumed equals an uninterrupted one, and a crash
between a checkpoint's files and its `latest` pointer resumes from the previous checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.conftest import TEST_OVERRIDES

pytestmark = pytest.mark.slow


def _run(tmp_path, pool, name, *overrides, expect=0):
    from system.train import main

    rc = main(["--config", "configs/debug.yaml", *TEST_OVERRIDES, f"output_dir={tmp_path}",
               f"run_name={name}", "checkpoint.every=2", *overrides], pool=pool)
    assert rc == expect
    return tmp_path / name


def _train_records(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == "train"]


# LoRA on 2 ranks, pi_ref from the base weights with the adapters off (reference.source=auto),
# adapter-only sync (whose checksums the driver compares at every sync), the merged model saved
# too; a high lr so the adapters move in 4 steps
LORA = ("learner.lora.rank=8", "learner.lr=1e-2", "learner.lora.save_merged=true")


def _kill_after_step_2_checkpoint(monkeypatch) -> None:
    from system import resume

    real_save = resume.save

    def killed(t, step):
        path = real_save(t, step)
        if step == 2:
            raise KeyboardInterrupt("killed after the step-2 checkpoint")
        return path

    monkeypatch.setattr(resume, "save", killed)


def _kill_before_step_4_pointer(monkeypatch) -> None:
    """Step 4's checkpoint files are in place, its `latest` pointer is never written."""
    from system import checkpoint

    real_write_latest, calls = checkpoint.write_latest, []

    def killed(run_dir, name):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between checkpoint files and latest pointer")
        real_write_latest(run_dir, name)

    monkeypatch.setattr(checkpoint, "write_latest", killed)


@pytest.mark.parametrize("ahead, lora", [(0, ()), (2, ()), (1, LORA)], ids=["on-policy", "ahead", "lora"])
def test_resume_equals_uninterrupted_run(actor_pool, tmp_path, monkeypatch, capsys, ahead, lora):
    """A run interrupted and resumed from its step-2 checkpoint equals the uninterrupted run.

    On-policy, the run dies between step 4's checkpoint files and its `latest` pointer: the
    complete but unnamed step-4 checkpoint is not loaded, the run resumes from step 2. Otherwise it
    is killed after its step-2 checkpoint. With rollout_ahead=2 the checkpoint holds the samples
    drawn for steps 3 and 4 by the policies before step 1's and step 2's updates; the resumed run
    learns from them, as the uninterrupted one does, and no sample is learned more than 2 versions
    after it was drawn. With LoRA (and rollout_ahead=1) the checkpoints and final/ hold the adapters
    (the base weights are the model directory's), and pi_ref comes from the learners' base weights
    with the adapters off (no reference worker; that the two sources give the same rows, KL and
    loss is tests/unit/test_lora.py's)."""
    a = (f"trainer.rollout_ahead={ahead}", *lora)
    straight = _run(tmp_path, actor_pool, "straight", "trainer.steps=4", *a)

    with monkeypatch.context() as patch:  # Ctrl-C: exit code 130 and the command that continues
        (_kill_after_step_2_checkpoint if ahead else _kill_before_step_4_pointer)(patch)
        _run(tmp_path, actor_pool, "resumed", "trainer.steps=4", *a, expect=130)
    hint = capsys.readouterr().err.strip().splitlines()[-1]
    assert hint.startswith("interrupted: continue from its latest checkpoint (step 2) with: python -m "
                           "system.train --config configs/debug.yaml ") and hint.endswith(" trainer.resume=auto")
    root = tmp_path / "resumed" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000002"
    assert (root / "step_000004").is_dir() == (not ahead)  # complete on disk, never pointed at
    pending = root / "step_000002" / "pending_sample.pt"
    assert pending.exists() == bool(ahead)
    if ahead:  # every in-flight sample, with the version that drew it
        saved = torch.load(pending, weights_only=False)
        assert [(x["step"], x["version"]) for x in saved] == [(3 + i, 2 - ahead + i) for i in range(ahead)]
    resumed = _run(tmp_path, actor_pool, "resumed", "trainer.steps=4", "trainer.resume=auto", *a)
    assert (root / "latest").read_text().strip() == "step_000004"

    a, b = _train_records(straight), _train_records(resumed)
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2, 3, 4]
    # a sample drawn at version v is learned at version <= v + k: 0, 1, 2, then k every step
    assert [x["staleness"] for x in a] == [x["staleness"] for x in b] == [min(s, ahead) for s in range(4)]
    for x, y in zip(a, b):
        for key in ("loss", "reward_mean", "kl_full", "clip_frac", "behavior_logp_gap"):
            assert x[key] == pytest.approx(y[key], abs=1e-6), (x["step"], key)
    assert any(abs(x["loss"]) > 0 for x in a)  # a real update happened
    weights = "model.safetensors"
    if lora:
        weights = "adapter_model.safetensors"
        assert a[-1]["kl_full"] > 1e-4 and a[-1]["ref_bytes"] == b[-1]["ref_bytes"] == 0
        _check_lora_outputs(straight)
    wa = load_file(straight / "final" / weights)
    wb = load_file(resumed / "final" / weights)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k


def _check_lora_outputs(run) -> None:
    """A sync sends the adapters only; final/ loads as a peft adapter on the base model and equals
    final/merged, the merged Hugging Face model, which differs from the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = dict(AutoModelForCausalLM.from_pretrained(run / "final" / "merged").named_parameters())
    full_bytes = sum(p.numel() * p.element_size() for p in merged.values())
    sync_bytes = _train_records(run)[-1]["sync_bytes"]
    assert 0 < sync_bytes < full_bytes / 4, (sync_bytes, full_bytes)
    base_path = json.loads((run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = dict(AutoModelForCausalLM.from_pretrained(base_path).named_parameters())
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), run / "final")
    for name, p in adapted.merge_and_unload().named_parameters():
        assert torch.allclose(p, merged[name], atol=1e-6, rtol=0), name
    assert any(not torch.equal(base[k], merged[k]) for k in merged)


@pytest.mark.fresh_actors  # first in the session: its first run is the session pool's start
def test_a_run_on_reused_actors_equals_the_run_that_started_them(actor_pool, tmp_path):
    """system.actors.ActorPool: the second run resets the first run's actors instead of starting
    its own, and trains exactly as the first did on fresh ones (same metrics, same final weights,
    bit for bit); a run whose config changes the actors' processes (one learner rank) is refused
    them (Actors.reusable; take() then starts new ones, as test_pipeline's one-rank run shows)."""
    from system.config import load_config

    actor_pool.close()  # fresh actors for the first run, whatever ran before in this session
    first = _run(tmp_path, actor_pool, "first", "trainer.steps=2")
    actors = actor_pool.actors
    second = _run(tmp_path, actor_pool, "second", "trainer.steps=2")
    assert actor_pool.actors is actors
    a, b = _train_records(first), _train_records(second)
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2]
    for x, y in zip(a, b):
        for key in ("loss", "reward_mean", "kl_full", "clip_frac", "weight_norm", "policy_version"):
            assert x[key] == y[key], (x["step"], key)
    wa = load_file(first / "final" / "model.safetensors")
    wb = load_file(second / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    one_rank = load_config("configs/debug.yaml", [*TEST_OVERRIDES, "learner.num_ranks=1"])
    assert not actors.reusable(one_rank, actors.model_path)  # take() would start new ones
