"""Several faults in one short run (system/chaos.py), and the run ends with the weights of the same
run without faults, bit for bit: the small version of `python -m system.experiments.chaos`."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from system import chaos
from system.chaos import Fault

pytestmark = pytest.mark.slow

# on-policy: a redone step samples again with the same policy and seeds (docs/reliability.md)
ARGS = ("trainer.steps=3", "trainer.rollout_ahead=0", "sync.bucket_mb=0.25", "sync.timeout_s=60")


def test_a_run_with_faults_ends_with_the_weights_of_the_run_without(faults_run, tmp_path):
    def run(name, schedule):
        hook = chaos.Hook(schedule, str(tmp_path / f"{name}.jsonl"), str(tmp_path / f"{name}-tokens"))
        with chaos.installed(hook):
            return faults_run(name, *ARGS, *hook.overrides())

    clean = run("clean", [])  # first: the faulty run, which restarts workers, leaves no actors
    assert clean.rc == 0, clean.err
    faulty = run("faulty", [Fault(1, "sync_corrupted"), Fault(2, "rollout_killed_generating"),
                            Fault(2, "reference_killed"), Fault(3, "rollout_killed_mid_sync")])
    assert faulty.rc == 0, faulty.err
    out = faulty.out
    assert "[faults] weight sync: rollout worker 0 checksum" in out and "retrying the sync once" in out
    assert "restarted during step 2" in out  # rollout and reference, redone once or twice
    assert "[faults] rollout worker 0 restarted during weight sync (policy version 3)" in out
    assert faulty.steps() == [1, 2, 3]
    assert faulty.records()[-1]["actor_restarts"] == 3
    a = load_file(clean.dir / "final" / "model.safetensors")
    b = load_file(faulty.dir / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max(float((a[k] - b[k]).abs().max()) for k in a)
