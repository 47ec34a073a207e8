"""A learner rank killed mid-run: the run stops with an error naming the rank, its node and the checkpoint;
the same command with trainer.resume=auto finishes the run (on the same actors, with a new learner
group: system/actors.py Actors.repair)."""

from __future__ import annotations

import re

import pytest

from tests.faults.conftest import before_steps, sigkill

pytestmark = pytest.mark.slow


def test_dead_learner_rank_stops_the_run_and_resume_finishes_it(faults_run, monkeypatch):
    before_steps(monkeypatch, {3: sigkill("learners", rank=1)})
    args = ("trainer.steps=4", "checkpoint.every=2")
    run = faults_run("learner", *args)
    assert run.rc == 1
    # the node too: on a cluster, a lost machine is the common cause
    assert re.match(r"error: learner rank 1 on node \w{6} \([0-9.]+\) died: ", run.err), run.err
    saved = run.dir / "checkpoints" / "step_000002"
    assert (f"Resubmit the same command with trainer.resume=auto to continue from the latest "
            f"checkpoint {saved}") in run.err
    assert "\n" not in run.err.strip()
    assert run.steps() == [1, 2]

    resumed = faults_run("learner", *args, "trainer.resume=auto")
    assert resumed.rc == 0, resumed.err
    # on the session's actors: the learner group is new, the rollout and reference workers kept
    assert "[placement] replaced what the last run lost: the 2 learner ranks\n" in resumed.out
    assert f"[resume] from {saved}: step 2" in resumed.out
    assert resumed.steps() == [1, 2, 3, 4]
    assert resumed.records()[-1]["policy_version"] == 4
