"""The debug run with rollout.backend=vllm (CPU build) through Ray and DeepSpeed, end to end, with
the vLLM rollout worker killed mid-run."""

from __future__ import annotations

import time

import pytest

from tests.faults.conftest import before_steps, sigkill
from tests.vllm.conftest import VLLM_OVERRIDES, alive, engine_processes

pytestmark = [pytest.mark.slow, pytest.mark.leaves_no_actors]  # it stops the actors at its end


def test_debug_run_on_vllm_survives_a_killed_rollout_worker_and_leaves_no_engine_behind(
        faults_run, actor_pool, monkeypatch):
    """Four steps on vLLM; before step 3 the rollout worker (and its engine) is SIGKILLed: Ray
    restarts it, it rejoins the sync group with a new engine in a new process, the run completes,
    and once the actors are stopped (as a single run's are at its end) nothing of either engine is
    left. One run for both: each start costs more than the steps."""
    seen = {}

    def engines(trainer) -> set[int]:
        import ray

        return engine_processes(ray.get(trainer.rollout.actors[0].pid.remote()))

    def kill(trainer):
        seen["killed"] = engines(trainer)
        sigkill("rollout")(trainer)

    def after_restart(trainer):
        seen["restarted"] = engines(trainer)
        seen["left_by_killed"] = alive(seen["killed"])

    before_steps(monkeypatch, {3: kill, 4: after_restart})
    run = faults_run("vllm", *VLLM_OVERRIDES, "trainer.steps=4")
    assert run.rc == 0, run.err
    train = run.records()
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    # step 1 was sampled by the policy the learners hold: vLLM's log-probs (pi_old) equal theirs;
    # step 2's during step 1's update, one update stale
    assert train[0]["behavior_logp_gap"] < 1e-5, train[0]["behavior_logp_gap"]
    assert train[1]["behavior_logp_gap"] > 1e-4, train[1]["behavior_logp_gap"]
    assert train[-1]["policy_version"] == 4
    assert (run.dir / "final" / "model.safetensors").exists()

    assert "[faults] rollout worker 0 restarted during" in run.out
    assert train[-1]["actor_restarts"] == 1
    assert seen["restarted"].isdisjoint(seen["killed"]), seen  # a new engine in a new process
    assert seen["left_by_killed"] == set(), seen  # nothing of the killed worker's engine is left
    actor_pool.close()  # what a single run (system.train without a pool) does at its end
    deadline = time.monotonic() + 30
    while alive(seen["restarted"]) and time.monotonic() < deadline:
        time.sleep(0.5)  # its actors are being killed
    assert alive(seen["restarted"]) == set(), seen
