"""NaN/inf in the loss or the gradients: the update is skipped on every rank and counted; too many
steps in a row stop the run with a clear error, and the last good checkpoint stays the latest and
loadable. faults.nan_loss_at makes the loss NaN; faults.nan_grad_at keeps it finite with NaN
gradients (caught by DeepSpeed's own check under ZeRO-1/2/3, by the learner's under ZeRO-0)."""

from __future__ import annotations

import math

import pytest
import torch

from system import checkpoint

pytestmark = pytest.mark.slow


def test_a_nan_loss_and_a_nan_gradient_skip_their_updates_and_the_run_completes(faults_run):
    run = faults_run("nan_once", "trainer.steps=4", "learner.zero_stage=2",
                     "faults.nan_loss_at=[2]", "faults.nan_grad_at=[3]")
    assert run.rc == 0, run.err
    assert run.steps() == [1, 2, 3, 4]
    records = run.records()
    assert [r["updates_skipped"] for r in records] == [0, 1, 1, 0]
    assert [r["nonfinite_skipped"] for r in records] == [0, 1, 2, 2]
    assert math.isnan(records[1]["loss"])  # reported, not hidden
    assert math.isfinite(records[2]["loss"])  # only the gradients were bad
    norms = [r["weight_norm"] for r in records]
    assert norms[0] == norms[1] == norms[2]  # steps 2 and 3 changed no weight
    assert norms[3] != norms[2]  # step 4 trained again
    assert "[faults] step 2: 1 update(s) skipped for a NaN/inf loss or gradient" in run.out


def test_nonfinite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(faults_run):
    run = faults_run("nan_streak", "trainer.steps=5", "learner.zero_stage=0", "checkpoint.every=1",
                     "checkpoint.keep=5", "faults.nan_loss_at=[2]", "faults.nan_grad_at=[3,4]",
                     "faults.max_nonfinite_in_a_row=3")
    assert run.rc == 1
    assert run.steps() == [1, 2, 3, 4]  # the failing steps are logged, then the run stops
    assert [r["nonfinite_skipped"] for r in run.records()] == [0, 1, 2, 3]
    assert ("step 4: the learners skipped the update for a NaN/inf loss or gradient 3 steps in a "
            "row (faults.max_nonfinite_in_a_row=3)") in run.err
    assert "\n" not in run.err.strip()
    root = run.dir / "checkpoints"
    good = root / "step_000001"
    assert f"continue from the latest checkpoint {good}" in run.err
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]  # none from NaN steps
    assert checkpoint.find_resumable(str(run.dir)) == str(good)
    assert checkpoint.damage(str(good)) is None
    states = list(good.glob("learner/**/*model_states.pt"))
    assert states, list(good.rglob("*"))
    module = torch.load(states[0], map_location="cpu", weights_only=False)["module"]
    assert module and all(torch.isfinite(t).all() for t in module.values() if torch.is_tensor(t))
