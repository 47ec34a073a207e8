"""The debug run with rollout.backend=vllm (CPU build) through Ray and DeepSpeed: end to end, and
with the vLLM rollout worker killed mid-run."""

from __future__ import annotations

import time

import pytest

from tests.faults.conftest import before_steps, sigkill
from tests.vllm.conftest import VLLM_OVERRIDES, alive, engine_processes

pytestmark = pytest.mark.slow


def test_debug_run_on_vllm_end_to_end(faults_run):
    run = faults_run("vllm", *VLLM_OVERRIDES, "trainer.steps=10")
    assert run.rc == 0, run.err
    train = run.records()
    assert [r["step"] for r in train] == list(range(1, 11))
    # step 1 was sampled by the policy the learners hold: vLLM's log-probs (pi_old) equal theirs
    assert train[0]["behavior_logp_gap"] < 1e-5, train[0]["behavior_logp_gap"]
    assert all(r["behavior_logp_gap"] > 1e-4 for r in train[1:])  # then one update stale
    assert train[-1]["policy_version"] == 10
    assert (run.dir / "final" / "model.safetensors").exists()


def test_a_killed_vllm_rollout_worker_restarts_and_leaves_no_engine_behind(faults_run, monkeypatch):
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

    before_steps(monkeypatch, {2: kill, 3: after_restart})
    run = faults_run("vllm_restart", *VLLM_OVERRIDES, "trainer.steps=3")
    assert run.rc == 0, run.err
    assert [r["step"] for r in run.records()] == [1, 2, 3]
    assert "[faults] rollout worker 0 restarted during" in run.out
    assert run.records()[-1]["actor_restarts"] == 1
    assert seen["restarted"].isdisjoint(seen["killed"]), seen  # a new engine in a new process
    assert seen["left_by_killed"] == set(), seen  # nothing of the killed worker's engine is left
    deadline = time.monotonic() + 30
    while alive(seen["restarted"]) and time.monotonic() < deadline:
        time.sleep(0.5)  # the run has ended: its actors are being killed
    assert alive(seen["restarted"]) == set(), seen
