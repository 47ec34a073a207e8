"""Checkpoints and resume: an interrupted run resumed equals an uninterrupted one, and a crash
between a checkpoint's files and its `latest` pointer resumes from the previous checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.conftest import TEST_OVERRIDES

pytestmark = pytest.mark.slow


def _run(tmp_path, name, *overrides):
    from system.train import main

    rc = main(["--config", "configs/debug.yaml", *TEST_OVERRIDES, f"output_dir={tmp_path}",
               f"run_name={name}", "checkpoint.every=2", *overrides])
    assert rc == 0
    return tmp_path / name


def _train_records(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == "train"]


@pytest.mark.parametrize("ahead", [0, 2])
def test_resume_equals_uninterrupted_run(ray_cluster, tmp_path, monkeypatch, ahead):
    """A run killed after its step-2 checkpoint and resumed equals the uninterrupted run. With
    rollout_ahead=2 the checkpoint holds the samples drawn for steps 3 and 4 by the policies before
    step 1's and step 2's updates; the resumed run learns from them, as the uninterrupted one does, and
    no sample is learned more than 2 versions after it was drawn."""
    from system.trainer import Trainer

    a = f"trainer.rollout_ahead={ahead}"
    straight = _run(tmp_path, "straight", "trainer.steps=4", a)

    real_save = Trainer.save_checkpoint

    def killed_after_step_2(self, step, start_eval):
        path = real_save(self, step, start_eval)
        if step == 2:
            raise KeyboardInterrupt("killed after the step-2 checkpoint")
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", killed_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "resumed", "trainer.steps=4", a)
    pending = tmp_path / "resumed" / "checkpoints" / "step_000002" / "pending_sample.pt"
    assert pending.exists() == bool(ahead)
    if ahead:  # both in-flight samples, with the versions that drew them
        saved = torch.load(pending, weights_only=False)
        assert [(x["step"], x["version"]) for x in saved] == [(3, 0), (4, 1)]
    monkeypatch.setattr(Trainer, "save_checkpoint", real_save)
    resumed = _run(tmp_path, "resumed", "trainer.steps=4", "trainer.resume=auto", a)

    a, b = _train_records(straight), _train_records(resumed)
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2, 3, 4]
    # a sample drawn at version v is learned at version <= v + k: 0, 1, 2, then k every step
    assert [x["staleness"] for x in a] == [x["staleness"] for x in b] == [min(s, ahead) for s in range(4)]
    for x, y in zip(a, b):
        for key in ("loss", "reward_mean", "kl_full", "clip_frac", "behavior_logp_gap"):
            assert x[key] == pytest.approx(y[key], abs=1e-6), (x["step"], key)
    assert any(abs(x["loss"]) > 0 for x in a)  # a real update happened
    wa = load_file(straight / "final" / "model.safetensors")
    wb = load_file(resumed / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k


def test_crash_before_latest_pointer_resumes_from_previous_checkpoint(ray_cluster, tmp_path,
                                                                      monkeypatch):
    from system import checkpoint

    real_write_latest = checkpoint.write_latest
    calls = []

    def dies_on_second_pointer(run_dir, name):
        calls.append(name)
        if len(calls) == 2:  # step 4's files are in place, its pointer is never written
            raise KeyboardInterrupt("killed between checkpoint files and latest pointer")
        real_write_latest(run_dir, name)

    monkeypatch.setattr(checkpoint, "write_latest", dies_on_second_pointer)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "crash", "trainer.steps=6")
    root = tmp_path / "crash" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000002"
    assert (root / "step_000004").is_dir()  # complete on disk, but never pointed at

    monkeypatch.setattr(checkpoint, "write_latest", real_write_latest)
    run = _run(tmp_path, "crash", "trainer.steps=6", "trainer.resume=auto")
    steps = [x["step"] for x in _train_records(run)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (root / "latest").read_text().strip() == "step_000006"
