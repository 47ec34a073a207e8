"""Weight-sync checksum mismatch (faults.corrupt_sync_at makes rollout worker 0 perturb a loaded
weight): once, the sync is retried and the run goes on; on the retry too, the run saves a
checkpoint and stops with a clear error."""

from __future__ import annotations

import pytest

from system import checkpoint

pytestmark = pytest.mark.slow


def test_a_corrupted_sync_is_retried_once_and_corrupted_again_on_the_retry_stops_the_run(faults_run):
    """Version 1 is corrupted once: retried, the run goes on. Version 2 is corrupted on the retry
    too: the run stops, keeping the learners' sound state. One run for both: a start costs more
    than the steps."""
    run = faults_run("sync", "trainer.steps=3", "faults.corrupt_sync_at=[1,2,2]")
    assert run.rc == 1
    assert "[faults] weight sync: rollout worker 0 checksum" in run.out
    assert "(policy version 1): retrying the sync once" in run.out
    assert run.out.count("retrying the sync once") == 2  # version 1, then version 2
    assert run.err.startswith("error: weight sync: rollout worker 0 checksum "), run.err
    assert "(policy version 2), and again on the retry" in run.err
    saved = run.dir / "checkpoints" / "step_000002"  # the learners' state is sound: kept
    assert f"continue from the latest checkpoint {saved}" in run.err
    assert checkpoint.damage(str(saved)) is None
    assert run.steps() == [1]  # step 1 synced after its retry; step 2 learned but never synced
