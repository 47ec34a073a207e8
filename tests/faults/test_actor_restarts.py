"""Rollout and reference workers killed mid-run: Ray restarts them, the step is redone, the run
finishes; past faults.max_actor_restarts the run saves a checkpoint and stops with a clear error; a
worker killed for good stops the run, and the next run on the same actors replaces it."""

from __future__ import annotations

import pytest

from system import checkpoint
from tests.faults.conftest import before_steps, ray_kill, sigkill

pytestmark = pytest.mark.slow


def _die_mid_sync(trainer):
    import ray

    ray.get(trainer.rollout.actors[0].die_during_next_sync.remote())


def test_killed_rollout_and_reference_workers_restart_and_the_run_finishes(faults_run, monkeypatch):
    # rollout: SIGKILL with a rollout_ahead sample in flight; reference: ray.kill (restartable);
    # then the rollout worker dies in the middle of step 4's weight broadcast (several buckets)
    before_steps(monkeypatch, {2: sigkill("rollout"), 3: ray_kill("reference"), 4: _die_mid_sync})
    run = faults_run("restarts", "trainer.steps=4", "trainer.rollout_ahead=1", "checkpoint.every=4",
                     "sync.bucket_mb=0.25", "sync.timeout_s=60")
    assert run.rc == 0, run.err
    assert run.steps() == [1, 2, 3, 4]
    restarts = {r["step"]: r["actor_restarts"] for r in run.records()}
    assert restarts[1] == 0 and restarts[2] == 1 and restarts[4] == 3, restarts
    assert "[faults] rollout worker 0 restarted during" in run.out
    assert "[faults] reference worker 0 restarted during" in run.out
    assert "[faults] rollout worker 0 restarted during weight sync (policy version 4)" in run.out
    last = run.records()[-1]
    assert last["policy_version"] == 4  # every step learned once: none was lost or doubled
    assert run.records("eval")[-1]["step"] == 4
    assert (run.dir / "final" / "model.safetensors").exists()
    # redone steps drew their prompts again from where they started: 4 steps x 8 prompts, no more
    state = checkpoint.load_state(str(run.dir / "checkpoints" / "step_000004"))
    assert state["sampler"] == {"epoch": 0, "pos": 32}


def test_past_the_restart_limit_the_run_saves_a_checkpoint_and_stops(faults_run, monkeypatch):
    before_steps(monkeypatch, {2: sigkill("rollout"), 3: ray_kill("reference")})
    # on-policy here (the test above covers rollout_ahead=1): the kill lands before step 2 samples
    run = faults_run("limit", "trainer.steps=4", "trainer.rollout_ahead=0", "faults.max_actor_restarts=1")
    assert run.rc == 1
    assert run.steps() == [1, 2]
    assert "[faults] rollout worker 0 restarted during step 2" in run.out  # step 2 was redone
    assert "reference worker 0 restarted during step 3" in run.err
    assert "more than faults.max_actor_restarts=1" in run.err
    saved = run.dir / "checkpoints" / "step_000002"  # the state after step 2, written at the stop
    assert f"trainer.resume=auto to continue from the latest checkpoint {saved}" in run.err
    assert checkpoint.damage(str(saved)) is None
    state = checkpoint.load_state(str(saved))
    assert state["faults"]["actor_restarts"] == 2
    assert state["sampler"] == {"epoch": 0, "pos": 16}  # step 3's prompts are not lost
    assert "\n" not in run.err.strip()


def test_a_worker_killed_for_good_stops_the_run_and_the_next_run_on_the_actors_replaces_it(
        faults_run, actor_pool, monkeypatch):
    import ray

    def kill_for_good(trainer):
        ray.kill(trainer.rollout.actors[0], no_restart=True)

    before_steps(monkeypatch, {2: kill_for_good})
    args = ("trainer.steps=2", "trainer.rollout_ahead=0")
    run = faults_run("gone", *args)
    assert run.rc == 1
    assert "rollout worker 0 died and Ray could not restart it" in run.err
    saved = run.dir / "checkpoints" / "step_000001"  # written at the stop: nothing learned is lost
    assert f"continue from the latest checkpoint {saved}" in run.err
    actors = actor_pool.actors
    learners = ray.get([a.pid.remote() for a in actors.learners.actors])

    resumed = faults_run("gone", *args, "trainer.resume=auto")
    assert resumed.rc == 0, resumed.err
    assert "[placement] replaced what the last run lost: rollout worker 0\n" in resumed.out
    assert actor_pool.actors is actors  # the same actors, with a new rollout worker
    assert ray.get([a.pid.remote() for a in actors.learners.actors]) == learners
    assert resumed.steps() == [1, 2] and resumed.records()[-1]["policy_version"] == 2
