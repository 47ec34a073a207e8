"""Weight-sync checksum mismatch (faults.corrupt_sync_at makes rollout worker 0 perturb a loaded
weight): once, the sync is retried and the run completes; on the retry too, the run saves a
checkpoint and stops with a clear error."""

from __future__ import annotations

import pytest

from system import checkpoint

pytestmark = pytest.mark.slow


def test_a_corrupted_sync_is_retried_once_and_the_run_completes(faults_run):
    run = faults_run("sync_once", "trainer.steps=2", "faults.corrupt_sync_at=[1]")
    assert run.rc == 0, run.err
    assert run.steps() == [1, 2]
    assert "[faults] weight sync: rollout worker 0 checksum" in run.out
    assert "(policy version 1): retrying the sync once" in run.out
    assert run.out.count("retrying the sync once") == 1


def test_a_sync_corrupted_again_on_the_retry_stops_the_run(faults_run):
    run = faults_run("sync_always", "trainer.steps=3", "faults.corrupt_sync_at=[2,2]")
    assert run.rc == 1
    assert run.err.startswith("error: weight sync: rollout worker 0 checksum "), run.err
    assert "(policy version 2), and again on the retry" in run.err
    saved = run.dir / "checkpoints" / "step_000002"  # the learners' state is sound: kept
    assert f"continue from the latest checkpoint {saved}" in run.err
    assert checkpoint.damage(str(saved)) is None
    assert run.steps() == [1]  # step 2 learned but never finished its sync
